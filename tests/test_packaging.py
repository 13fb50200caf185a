"""What the wheel carries and what each part imports: the client alone stays light."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from wheels import build_wheel

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "tritonclient",
               "prometheus_client", "pybase64", "aiohttp", "python_multipart"}  # fmt: skip
HEAVY = {"torch", "torchvision", "transformers"}
RAY = {"ray", "pyarrow", "pandas", "fsspec"}  # `iei.ray` alone imports these


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    return zipfile.ZipFile(build_wheel(tmp_path_factory.mktemp("wheel")))


def source_files(folder: str) -> list[str]:
    """Files under `folder` of the tree (caches left out), relative to its root."""
    found = (ROOT / folder).rglob("*")
    return [str(p.relative_to(ROOT)) for p in found if p.is_file() and "__pycache__" not in p.parts]


def test_the_wheel_carries_every_module_the_demo_page_and_the_model_repository(wheel):
    names = set(wheel.namelist())
    for path in source_files("frontend/iei"):
        if path.endswith((".py", ".html")):
            assert path.removeprefix("frontend/") in names, path
    for path in source_files("model_repository"):
        assert f"iei/{path}" in names, path
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_the_base_install_is_the_client_and_the_extras_add_the_parts(wheel):
    [metadata_name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    by_extra: dict[str, set[str]] = {}
    for line in metadata.get_all("Requires-Dist"):
        requirement = Requirement(line)
        marker = str(requirement.marker or "")
        extra = marker.split('extra == "')[1].split('"')[0] if "extra ==" in marker else ""
        by_extra.setdefault(extra, set()).add(canonicalize_name(requirement.name))
    assert by_extra[""] == {"httpx", "numpy", "pillow", "orjson", "tqdm"}
    assert {"fastapi", "uvicorn", "tritonclient", "prometheus-client"} <= by_extra["server"]
    assert {"iei", "nvidia-pytriton", "transformers"} <= by_extra["serve-base"]
    # Each serve flavour: the shared part and its own torch (CUDA 13 or CUDA 12 builds).
    assert {"iei", "torch", "torchvision"} == by_extra["serve"]
    assert {"iei", "torch", "torchvision", "nvidia-nvimgcodec-cu12"} <= by_extra["serve-cu12"]
    assert not HEAVY & by_extra["server"]
    # Bulk jobs: Ray Data with the NumPy 1.x that nvidia-pytriton needs (pyarrow < 26).
    assert {"ray", "pyarrow", "fsspec"} == by_extra["ray"]


def top_level_modules_after(imports: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after `import <imports>`."""
    code = f"import sys, {imports}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(eval(result.stdout))  # noqa: S307 (our own subprocess's list of names)


def test_the_client_and_its_commands_import_nothing_of_the_server():
    loaded = top_level_modules_after("iei.cli, iei.client, iei.client.bulk, iei.client.similar")
    assert not (SERVER_ONLY | HEAVY | RAY) & loaded


def test_the_frontend_image_s_modules_import_only_the_server_extra():
    """The frontend image installs `.[server]`: no torch, and none of what the launcher needs
    (protobuf, grpc: tritonclient's gRPC client). Its preflight once imported the launcher's
    settings, and the container never started."""
    loaded = top_level_modules_after("iei.server.app, iei.server.preflight")
    assert not (HEAVY | RAY | {"google", "grpc"}) & loaded


def test_the_makefile_s_setup_installs_the_ray_extra():
    makefile = (ROOT / "Makefile").read_text()
    [line] = [line for line in makefile.splitlines() if "pip install" in line and "dev" in line]
    extras = line.split("'.[")[1].split("]'")[0].split(",")
    assert "ray" in extras, line
