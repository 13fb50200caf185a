"""bench/gpu_bundle.py: the offline GPU bundle's wheels trimmed consistently, and the GPU host's
fail-fast checks, each stopping with one line (run here against this machine's Python and the
nvidia-pytriton wheel installed in it, as if it were the bundle's)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
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


def test_without_a_bundle_the_gpu_bench_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    """On stdout, and under $OUT/docs (a lent GPU machine hands back only $OUT)."""
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_bundle.run([], bundle=tmp_path / "none", env=tmp_path / "env") == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [f"bench-gpu: no bundle at {tmp_path / 'none'}: run `make gpu-bundle` where "
                   "the index answers"]  # fmt: skip
    setup = tmp_path / "out" / "docs" / "benchmarks" / "gpu-setup.txt"
    assert setup.read_text().splitlines() == out
    gpu_bundle.run(["--out", str(tmp_path / "given")], bundle=tmp_path / "none")
    assert (tmp_path / "given" / "benchmarks" / "gpu-setup.txt").read_text().splitlines() == out


def test_run_passes_out_on_to_the_bench_and_reads_the_bundle_from_bundle(tmp_path, monkeypatch):
    runs: list[tuple[list[str], Path]] = []
    monkeypatch.setattr(gpu_bundle, "run", lambda args, bundle: runs.append((args, bundle)) or 0)
    gpu_bundle.main(["run", "--out", "/x/docs", "--budget", "300", "--bundle", str(tmp_path)])
    assert runs == [(["--out", "/x/docs", "--budget", "300"], tmp_path)]


def test_the_runner_bounds_its_setup_by_the_budget_and_tells_the_bench_when_it_began(
    tmp_path, monkeypatch
):
    """--budget is the whole run from the runner's start: its install and checks get the same
    deadline, and bench.gpu is passed --started so that its windows shrink by the setup."""
    import time

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "MANIFEST.json").write_text("{}")
    deadlines: list[float] = []
    commands: list[list[str]] = []

    def install(bundle: Path, env: Path, deadline: float | None = None) -> Path:
        deadlines.append(deadline or 0.0)
        return tmp_path / "site"

    monkeypatch.setattr(gpu_bundle, "install", install)
    monkeypatch.setattr(gpu_bundle, "check", lambda site, deadline=None: deadlines.append(deadline))
    monkeypatch.setattr(gpu_bundle.subprocess, "run",
                        lambda command, **options: commands.append(command) or
                        type("Done", (), {"returncode": 0})())  # fmt: skip
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    before = time.time()
    assert gpu_bundle.run(["--budget", "200", "--layouts", "split"], bundle, tmp_path / "env") == 0
    [command] = commands
    assert command[:5] == [sys.executable, "-m", "bench.gpu", "--budget", "200"]
    assert command[7] == "--started" and before <= float(command[8]) <= time.time()
    assert deadlines == [float(command[8]) + 200] * 2


def test_a_setup_step_past_the_budget_stops_the_run_in_one_line(site, monkeypatch):
    import time

    folder, libs = site
    (folder / "nvidia_pytriton.libs").symlink_to(libs)
    monkeypatch.setattr(gpu_bundle, "IMPORTS_PROBE", "import time\ntime.sleep(30)\n")
    with pytest.raises(gpu_bundle.Missing) as missing:
        gpu_bundle.check(folder, deadline=time.time() + 3)
    assert re.fullmatch(
        r"the import and decode check did not finish in the [23] s the budget left",
        str(missing.value),
    )
    with pytest.raises(gpu_bundle.Missing, match=r"^the budget ran out before ldd$"):
        gpu_bundle.check(folder, deadline=time.time() - 1)


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


# nvImageCodec's Python API as iei_runtime.jpeg_decoders calls it; `decode` gives `RESULT` per
# file: None, as the real one does for every file where libnvjpeg cannot be loaded, or a CPU
# tensor standing in for the GPU image (DLPack takes either).
FAKE_NVIMGCODEC = """
import torch

class BackendKind:
    HW_GPU_ONLY, GPU_ONLY = 1, 2

class Backend:
    def __init__(self, kind):
        self.kind = kind

class DecodeParams:
    def __init__(self, **params):
        self.params = params

class Decoder:
    def __init__(self, **options):
        self.options = options

    def decode(self, files, params=None):
        return [RESULT for _ in files]
"""


@pytest.mark.parametrize(
    ("result", "refused"),
    [("None", True), ("torch.zeros((48, 64, 3), dtype=torch.uint8)", False)],
)
def test_the_checks_decode_a_jpeg_with_nvimagecodec_not_only_import_it(
    site, tmp_path, monkeypatch, result, refused
):
    """An nvImageCodec that imports but decodes nothing (no loadable libnvjpeg) stops the run
    with one line; one that decodes passes (the import checks are skipped: no CUDA here)."""
    folder, libs = site
    (folder / "nvidia_pytriton.libs").symlink_to(libs)
    fake = tmp_path / "fake" / "nvidia" / "nvimgcodec"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_NVIMGCODEC.replace("RESULT", result))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setattr(gpu_bundle, "IMPORTS_PROBE", "", raising=False)
    if not refused:
        gpu_bundle.check(folder)
        return
    with pytest.raises(gpu_bundle.Missing) as missing:
        gpu_bundle.check(folder)
    message = str(missing.value)
    assert message.startswith("nvImageCodec cannot decode a JPEG on cuda:0: ")
    assert "\n" not in message
    assert "nvimagecodec's warm-up decode failed: it refused a plain JPEG" in message


def test_another_python_is_refused_first(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_bundle, "PYTHON", "3.99")
    with pytest.raises(gpu_bundle.Missing, match=f"Python 3.99 is needed .*, not {VERSION}$"):
        gpu_bundle.check(tmp_path)


def test_transformers_keeps_the_wanted_model_folders_and_those_their_code_imports():
    files = {
        "transformers/models/auto/modeling_auto.py": "MAPPING = {'vit': 'ViTModel'}\n",
        "transformers/models/vit/modeling_vit.py": "from ..deit.configuration_deit import X\n",
        "transformers/models/deit/configuration_deit.py": "from ...models.bert import Y\n",
        "transformers/models/bert/__init__.py": "import transformers.models.roberta.tokenizer\n",
        "transformers/models/roberta/tokenizer.py": "",
        "transformers/models/llama/modeling_llama.py": "from ..gemma import Z\n",
        "transformers/models/gemma/modeling_gemma.py": "",
    }
    kept = gpu_bundle.transformers_models(files, ["auto", "vit", "nonexistent"])
    assert kept == {"auto", "vit", "deit", "bert", "roberta"}
    assert gpu_bundle.dropped("transformers/models/llama/modeling_llama.py", kept)
    assert not gpu_bundle.dropped("transformers/models/vit/modeling_vit.py", kept)
    assert not gpu_bundle.dropped("transformers/models/__init__.py", kept)  # the package itself
    assert not gpu_bundle.dropped("transformers/models/llama/__init__.py", kept)


TRIMMED_LOAD = """
import sys, torch
sys.path[:0] = [{repository!r}]
import transformers
assert transformers.__file__.startswith({trimmed!r}), transformers.__file__
from iei_runtime import loading, settings
for family, folder in {folders!r}.items():
    config = settings.read_settings({{}}, {{"IMAGE_EMBEDDING_MODEL": folder, "IEI_DTYPE": "float32",
                                       "IEI_ENGINE": "torch"}})
    embedder = loading.load_embedder(config, torch.device("cpu"), 1)
    embedder.close()
    if embedder.zero_shot:
        loading.load_text_embedder(config, torch.device("cpu"))
    print("loaded", family)
"""


@pytest.mark.integration
def test_every_family_loads_with_the_bundles_trimmed_transformers(tmp_path):
    """The installed transformers without the model folders the bundle leaves out serves every
    family IEI supports, images and texts (the rule applied to the installed package)."""
    import shutil
    import subprocess

    import transformers
    from tiny_models import FAMILIES, PREPROCESSORS, build_tiny_model

    installed = Path(transformers.__file__).parent
    sources = {
        f"transformers/{p.relative_to(installed)}": p.read_text(errors="replace")
        for p in (installed / "models").rglob("*.py")
    }
    kept = gpu_bundle.transformers_models(sources, gpu_bundle.TRANSFORMERS_MODELS)
    trimmed = tmp_path / "site"

    def ignore(folder: str, names: list[str]) -> set[str]:
        inside = Path(folder).relative_to(installed.parent)
        return {
            n for n in names
            if n == "__pycache__" or gpu_bundle.dropped(f"{inside.as_posix()}/{n}", kept)
        }  # fmt: skip

    shutil.copytree(installed, trimmed / "transformers", ignore=ignore)
    models = trimmed / "transformers" / "models"
    left = {p.parent.name for p in models.glob("*/*.py") if p.name != "__init__.py"}
    assert left == set(kept) and len(left) < 40
    folders = {
        family: str(build_tiny_model(family, tmp_path / family))
        for family in sorted(set(FAMILIES) | set(PREPROCESSORS))
    }
    script = TRIMMED_LOAD.format(
        repository=str(ROOT / "model_repository"), trimmed=str(trimmed), folders=folders
    )
    env = {**os.environ, "PYTHONPATH": str(trimmed), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("loaded ") == len(folders)


def test_a_repacked_wheels_binaries_are_stripped_still_load_and_the_record_says_so(tmp_path):
    """An extension module with its symbol table and debug data (gevent's, a dependency of the
    frontend's tritonclient): smaller after repack, the RECORD's hash and size its own, and
    Python still imports it from the repacked file."""
    import base64
    import hashlib
    import importlib.machinery
    import shutil

    if shutil.which("strip") is None:
        pytest.skip("no strip (binutils) on this machine")
    gevent = importlib.util.find_spec("gevent._gevent_c_ident")
    assert gevent is not None and gevent.origin is not None
    name = f"gevent/{Path(gevent.origin).name}"
    original = Path(gevent.origin).read_bytes()
    source, target = tmp_path / "gevent-1.0-py3-none-any.whl", tmp_path / "out.whl"
    with zipfile.ZipFile(source, "w") as wheel:
        wheel.writestr(name, original)
        wheel.writestr(
            "gevent-1.0.dist-info/RECORD", f"{name},sha256=x,1\ngevent-1.0.dist-info/RECORD,,\n"
        )
    assert gpu_bundle.repack(source, target) == 0
    with zipfile.ZipFile(target) as wheel:
        binary = wheel.read(name)
        record = dict(
            line.split(",", 1)
            for line in wheel.read("gevent-1.0.dist-info/RECORD").decode().split()
        )
    assert len(binary) < 0.9 * len(original)
    digest = base64.urlsafe_b64encode(hashlib.sha256(binary).digest()).rstrip(b"=").decode()
    assert record == {name: f"sha256={digest},{len(binary)}", "gevent-1.0.dist-info/RECORD": ","}
    path = tmp_path / Path(gevent.origin).name
    path.write_bytes(binary)
    loader = importlib.machinery.ExtensionFileLoader("gevent._gevent_c_ident", str(path))
    spec = importlib.util.spec_from_file_location("gevent._gevent_c_ident", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    assert module.__file__ == str(path) and hasattr(module, "IdentRegistry")
    assert gpu_bundle.stripped(b"not an ELF file") == b"not an ELF file"


@pytest.fixture
def icu_stub():
    """(name, bytes) of the empty ICU data library standing in for this wheel's."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nvidia-pytriton is not installed")
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    [real] = libs.glob("libicudata-*.so.*")
    data = gpu_bundle.icu_data_stub(f"nvidia_pytriton.libs/{real.name}")
    if data is None:
        pytest.skip("no C compiler to build the empty ICU data library")
    return real, data


def test_the_icu_data_stub_is_an_empty_icu_package_under_the_real_librarys_name(icu_stub, tmp_path):
    import ctypes
    import shutil
    import subprocess

    real, data = icu_stub
    assert len(data) < 20_000 < real.stat().st_size
    path = tmp_path / real.name
    path.write_bytes(data)
    objdump = shutil.which("objdump")
    assert objdump is not None  # binutils: icu_data_stub's compiler links with them
    soname = subprocess.run([objdump, "-p", str(path)], capture_output=True, text=True).stdout
    assert f"SONAME               {real.name}" in soname
    major = real.name.rsplit(".so.", 1)[1].split(".")[0]
    header = (ctypes.c_ubyte * 40).in_dll(ctypes.CDLL(str(path)), f"icudt{major}_dat")
    raw = bytes(header)
    assert raw[:4] == bytes([32, 0, 0xDA, 0x27])  # header size 32, ICU's magic
    assert raw[12:16] == b"CmnD" and raw[16:20] == bytes([1, 0, 0, 0])  # common data, format 1
    assert raw[32:36] == bytes(4)  # no items
    assert gpu_bundle.icu_data_stub("nvidia_pytriton.libs/libicuuc-4683f362.so.70.1") is None


@pytest.mark.integration
def test_triton_stripped_with_the_empty_icu_data_serves_the_same_vectors(
    icu_stub, tmp_path, model_dirs
):
    """The bundle's Triton as the bundle trims it (tritonserver, libtritonserver, the Python
    backend and its stub stripped, ICU's data library the empty one), laid out as the bundle
    installs it, serves an image through `iei serve` with the in-process reference's vector."""
    import base64

    import httpx
    import numpy as np
    from reference import Reference, cosine_rows
    from sample_images import photos
    from stack import Stack, descendants

    real, stub = icu_stub
    wheel = real.parent.parent
    site = tmp_path / "site"
    libs = site / "nvidia_pytriton.libs"
    libs.mkdir(parents=True)
    for library in real.parent.iterdir():
        if library.name == real.name:
            (libs / library.name).write_bytes(stub)
        elif library.name.startswith("libtritonserver-"):
            (libs / library.name).write_bytes(gpu_bundle.stripped(library.read_bytes()))
        else:
            (libs / library.name).symlink_to(library)
    server = site / "pytriton" / "tritonserver"
    binary = server / "bin" / "tritonserver"  # a copy: its RPATH ($ORIGIN/../../..) finds libs
    binary.parent.mkdir(parents=True)
    binary.write_bytes(
        gpu_bundle.stripped((wheel / "pytriton/tritonserver/bin/tritonserver").read_bytes())
    )
    binary.chmod(0o755)
    assert binary.stat().st_size < (wheel / "pytriton/tritonserver/bin/tritonserver").stat().st_size
    real_server = wheel / "pytriton" / "tritonserver"
    for part in ("backends/python/libtriton_python.so",
                 f"python_backend_stubs/{VERSION}/triton_python_backend_stub"):  # fmt: skip
        (server / part).parent.mkdir(parents=True)
        (server / part).write_bytes(gpu_bundle.stripped((real_server / part).read_bytes()))
        (server / part).chmod(0o755)
    for other in (real_server / "backends" / "python").iterdir():
        if not (server / "backends" / "python" / other.name).exists():
            (server / "backends" / "python" / other.name).symlink_to(other)
    (site / "pytriton" / "__init__.py").write_text("")
    paths = [str(site), str(ROOT / "frontend"), os.environ.get("PYTHONPATH", "")]
    stack = Stack(model_dirs["vit"], tmp_path / "stack.log", PYTHONPATH=os.pathsep.join(paths))
    stack.start()
    try:
        assert stack.process is not None
        tritons = [pid for pid in descendants(stack.process.pid) if _exe(pid) == binary]
        assert tritons, "iei serve did not start the bundle's tritonserver"
        maps = Path(f"/proc/{tritons[0]}/maps").read_text()
        assert str(libs / real.name) in maps, "tritonserver did not load the empty ICU data"
        image = photos()["astronaut.jpg"]
        body = {"inputs": base64.b64encode(image).decode()}
        answer = httpx.post(f"{stack.url}/embed", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        served = np.asarray(answer.json(), dtype=np.float32)
        expected = Reference(model_dirs["vit"]).embed([image])
        assert cosine_rows(served, expected).min() > 0.999
    finally:
        assert stack.stop() == 0, stack.log()


def _exe(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def test_a_staged_bundle_installs_its_wheels_and_the_triton_server_laid_out_as_the_wheels(
    tmp_path,
):
    """stage's two tarballs (from a stand-in of the nvidia-pytriton wheel with its folders'
    entries, as the real one has) install: the server's files where `iei serve` looks."""
    pytriton = tmp_path / "nvidia_pytriton-0.7.0-py3-none-any.whl"
    with zipfile.ZipFile(pytriton, "w") as wheel:
        wheel.writestr("pytriton/tritonserver/backends/python/", b"")  # a folder's entry
        wheel.writestr("pytriton/tritonserver/backends/python/libtriton_python.so", b"backend")
        wheel.writestr("pytriton/tritonserver/bin/tritonserver", b"server")
        wheel.writestr(f"pytriton/tritonserver/python_backend_stubs/{gpu_bundle.PYTHON}/"
                       "triton_python_backend_stub", b"stub")  # fmt: skip
        wheel.writestr("pytriton/tritonserver/python_backend_stubs/3.10/", b"")
        wheel.writestr("pytriton/models/model.py", b"not the server's")
        wheel.writestr("nvidia_pytriton.libs/libpython3.12.so.1.0", b"the host's")
        wheel.writestr("nvidia_pytriton.libs/libxml2-4b4b5b24.so.2.9.13", b"xml")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    gpu_bundle.xz_tar(bundle / "tritonserver.tar.xz", gpu_bundle.triton_files(pytriton))
    package = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(package, "w") as wheel:
        wheel.writestr("pkg/__init__.py", b"x = 1\n")
        wheel.writestr(
            "pkg-1.0.dist-info/METADATA", b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n"
        )
        wheel.writestr(
            "pkg-1.0.dist-info/WHEEL",
            b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(
            "pkg-1.0.dist-info/RECORD", b"pkg/__init__.py,,\npkg-1.0.dist-info/RECORD,,\n"
        )
    repacked = tmp_path / "stored" / package.name
    repacked.parent.mkdir()
    gpu_bundle.repack(package, repacked)
    gpu_bundle.xz_tar(bundle / "wheels.tar.xz", [(package.name, repacked.read_bytes(), 0o644)])
    files = {p.name: gpu_bundle.sha256(p) for p in bundle.glob("*.tar.xz")}
    (bundle / "MANIFEST.json").write_text(json.dumps({"files": files}))
    site = gpu_bundle.install(bundle, tmp_path / "env")
    installed = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert [p for p in installed if not p.startswith("pkg")] == [
        "nvidia_pytriton.libs/libxml2-4b4b5b24.so.2.9.13",
        "pytriton/__init__.py",
        "pytriton/tritonserver/backends/python/libtriton_python.so",
        "pytriton/tritonserver/bin/tritonserver",
        f"pytriton/tritonserver/python_backend_stubs/{gpu_bundle.PYTHON}/triton_python_backend_stub",
    ]
    assert (site / "pytriton/tritonserver/bin/tritonserver").read_bytes() == b"server"
    assert (site / "pkg" / "__init__.py").read_text() == "x = 1\n"
