"""bench/gpu_bundle.py: the offline GPU bundle's wheels trimmed consistently, and the GPU host's
fail-fast checks, each stopping with one line (run here against this machine's Python and the
nvidia-pytriton wheel installed in it, as if it were the bundle's)."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_bundle  # noqa: E402

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_a_repacked_wheel_drops_tests_and_other_pythons_binaries_and_its_record_agrees(tmp_path):
    source, target = tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "out.whl"
    files = {
        "pkg/__init__.py": b"x = 1\n",
        "pkg/tests/test_pkg.py": b"assert True\n",
        "pkg/__init__.pyi": b"x: int\n",
        "nvidia/nvimgcodec/nvimgcodec_impl.cpython-312-x86_64-linux-gnu.so": b"312",
        "nvidia/nvimgcodec/nvimgcodec_impl.cpython-311-x86_64-linux-gnu.so": b"311",
        "nvidia/nvimgcodec/nvimgcodec_impl.cpython-39-x86_64-linux-gnu.so": b"39",
        "nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0.9.0": b"gpu jpeg",
        "nvidia/nvimgcodec/extensions/libnvjpeg2k_ext.so.0.9.0": b"jpeg 2000",
        "nvidia/nvimgcodec/extensions/libopencv_ext.so.0.9.0": b"cpu codecs",
    }
    record = "".join(f"{name},sha256=x,1\n" for name in files) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(source, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("pkg-1.0.dist-info/RECORD", record)
    assert gpu_bundle.repack(source, target) == 6
    with zipfile.ZipFile(target) as wheel:
        names = set(wheel.namelist())
        kept = {n.split(",")[0] for n in wheel.read("pkg-1.0.dist-info/RECORD").decode().split()}
        assert {i.compress_type for i in wheel.infolist()} == {zipfile.ZIP_STORED}
    assert names == {
        "pkg/__init__.py",
        "nvidia/nvimgcodec/nvimgcodec_impl.cpython-312-x86_64-linux-gnu.so",
        "nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0.9.0",
        "pkg-1.0.dist-info/RECORD",
    }
    assert kept == names


def test_without_a_bundle_the_gpu_bench_says_so_in_one_line(tmp_path, capsys):
    assert gpu_bundle.run([], bundle=tmp_path / "none", env=tmp_path / "env") == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [f"bench-gpu: no bundle at {tmp_path / 'none'}: run `make gpu-bundle` where "
                   "the index answers"]  # fmt: skip


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A bundle's install of Triton, from the nvidia-pytriton wheel of this environment, for this
    Python (the checks take this Python for the bundle's)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nvidia-pytriton is not installed")
    wheel = Path(next(iter(spec.submodule_search_locations))).parent
    monkeypatch.setattr(gpu_bundle, "PYTHON", VERSION)
    server = tmp_path / "site" / "pytriton" / "tritonserver"
    real = wheel / "pytriton" / "tritonserver"
    for part in ("bin/tritonserver", "backends/python/libtriton_python.so",
                 f"python_backend_stubs/{VERSION}/triton_python_backend_stub"):  # fmt: skip
        (server / part).parent.mkdir(parents=True, exist_ok=True)
        (server / part).symlink_to(real / part)
    return tmp_path / "site", wheel / "nvidia_pytriton.libs"


def test_the_checks_name_a_library_the_stub_cannot_load(site):
    folder, _ = site  # no nvidia_pytriton.libs beside it
    with pytest.raises(
        gpu_bundle.Missing, match=r"^triton_python_backend_stub cannot load: .*\(ldd\)$"
    ):
        gpu_bundle.check(folder)


def test_the_checks_name_a_missing_libpython(site, tmp_path, monkeypatch):
    folder, libs = site
    (folder / "nvidia_pytriton.libs").symlink_to(libs)
    monkeypatch.setattr(gpu_bundle.sysconfig, "get_config_var", lambda name: str(tmp_path))
    with pytest.raises(gpu_bundle.Missing, match=f"libpython{VERSION}.so.1.0 is missing"):
        gpu_bundle.check(folder)


def test_the_checks_stop_at_the_first_failing_import_here_cuda(site):
    folder, libs = site
    (folder / "nvidia_pytriton.libs").symlink_to(libs)
    with pytest.raises(gpu_bundle.Missing) as missing:
        gpu_bundle.check(folder)  # ldd passes; numpy 1.26.4 and the imports too; no CUDA here
    message = str(missing.value)
    assert message.startswith("import check failed: AssertionError: torch") and "\n" not in message
    assert "sees no CUDA device" in message


def test_another_python_is_refused_first(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_bundle, "PYTHON", "3.99")
    with pytest.raises(gpu_bundle.Missing, match=f"Python 3.99 is needed .*, not {VERSION}$"):
        gpu_bundle.check(tmp_path)
