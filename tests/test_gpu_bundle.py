"""bench/gpu_bundle.py: the offline GPU bundle's wheels trimmed consistently, and the GPU host's
fail-fast checks, each stopping with one line (run here against this machine's Python and the
nvidia-pytriton wheel installed in it, as if it were the bundle's)."""

from __future__ import annotations

import importlib.util
import os
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
