"""docker compose files and Dockerfiles, checked statically: no Docker engine runs here.

What they must hold: a GPU reservation and a CPU variant without one, Triton's launch through
`iei triton`, ports and health checks that agree with the settings, pinned images and packages.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployment_settings import frontend_container, triton_container
from google.protobuf import text_format
from iei import settings as table
from iei.launcher.frontend import CPU_HOST_WORKERS, auto_workers
from iei.launcher.repository import gpu_count, render_model_repository, shipped_model_repository
from iei.launcher.settings import LauncherSettings
from iei.launcher.triton_process import triton_command
from iei.server.settings import ServerSettings
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tritonclient.grpc import model_config_pb2

DEFAULT_MODEL_REPOSITORY = shipped_model_repository()

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
# Everything Triton runs: each model's model.py and the code they share (iei_runtime).
MODEL_SOURCES = sorted((ROOT / "model_repository").rglob("*.py"))
MODEL_PACKAGES = {"iei_runtime", "triton_python_backend_utils"}  # the repository's own, Triton's
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NGC_TRITON = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, the version tests run
# Read by the frontend image's command (uvicorn's worker count), not by Python code.
IMAGE_COMMAND_READS = {"IEI_WORKERS"}


class Reset:
    """Compose's `!reset` tag: the override removes the attribute."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def load_compose(name: str) -> dict[str, Any]:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge for mappings (enough for our override files)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Reset):
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def interpolate(value: str) -> str:
    """`${NAME:-default}` as compose resolves it with nothing set in the shell or .env."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def split_layout_shm_gib(gpus: int) -> float:
    """/dev/shm the split layout's stubs hold at the defaults when every image is a large photo
    (iei.launcher.repository.split_layout_shm_bytes: the arithmetic of docs/gpu.md)."""
    from iei import settings as table
    from iei.launcher.repository import PREPROCESS_PER_GPU, split_layout_shm_bytes

    assert table.SETTINGS["workers"].default == "auto"  # 2 in the frontend's container: no GPU
    workers = auto_workers(cores=1, gpus=0)
    in_flight = workers * table.SETTINGS["max_concurrent_images"].default
    needed = split_layout_shm_bytes(
        gpus=gpus, preprocess_instances=PREPROCESS_PER_GPU * gpus, images_in_flight=in_flight
    )
    return needed / 2**30


def gigabytes(size: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(size).lower()).groups()
    return float(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit] / 2**30


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DOCKER / name).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    steps = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            steps.append((instruction.upper(), arguments.strip()))
    return steps


def cmd_of(name: str) -> list[str]:
    [cmd] = [json.loads(args) for instruction, args in dockerfile(name) if instruction == "CMD"]
    return cmd


def requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pin(requirement: Requirement) -> str:
    [spec] = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not pinned"
    return spec.version


def third_party_imports(path: Path) -> set[str]:
    """Top-level modules a file imports (also inside functions), stdlib left out."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


def cli_modules() -> list[Path]:
    """Files of the `iei` package that `iei triton` (and `iei serve`) import, from a fresh
    interpreter."""
    code = (
        "import sys, iei.cli, iei.launcher.serve; "
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items()"
        " if n == 'iei' or n.startswith('iei.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.split()]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose("docker-compose.yml")["services"]


@pytest.fixture(scope="module")
def triton(compose) -> dict[str, Any]:
    return compose["triton"]


@pytest.fixture(scope="module")
def frontend(compose) -> dict[str, Any]:
    return compose["frontend"]


# --- docker compose ---------------------------------------------------------------------------


def test_two_services_built_from_the_docker_folder(compose):
    assert set(compose) == {"triton", "frontend"}
    for service in compose.values():
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert Path(service["build"]["dockerfile"]).parent == Path("docker")


def test_triton_runs_iei_triton_as_its_image_does(triton):
    assert triton["command"] == ["iei", "triton"]
    assert cmd_of("triton.Dockerfile") == ["iei", "triton"]


def test_triton_reserves_nvidia_gpus(triton):
    [device] = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device["count"] == "all" or int(device["count"]) >= 1


def test_triton_has_shared_memory_for_the_python_backend(triton):
    needed = split_layout_shm_gib(gpus=1)
    assert needed > 8  # 16 preprocessing stubs and the encoder, 64 large photos each
    assert needed <= gigabytes(triton["shm_size"]) <= needed + 2


def seconds(duration: str) -> float:
    """A compose duration (`40s`, `1m30s`) in seconds."""
    import re

    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_each_service_is_given_the_time_its_drain_takes_before_it_is_killed(
    triton, frontend, monkeypatch
):
    """Docker kills a container 10 s after SIGTERM by default: uvicorn's 30 s for the requests
    in flight (its image's command), Triton's 15 s, were cut short."""
    import re

    [drain] = re.findall(
        r"--timeout-graceful-shutdown (\d+)", " ".join(cmd_of("frontend.Dockerfile"))
    )
    assert seconds(frontend["stop_grace_period"]) >= int(drain) + 5
    for name, value in triton["environment"].items():
        monkeypatch.setenv(name, interpolate(value))
    arguments = " ".join(triton_command(LauncherSettings(), Path("/repo")))
    [exit_timeout] = re.findall(r"--exit-timeout-secs[= ](\d+)", arguments)
    assert seconds(triton["stop_grace_period"]) >= int(exit_timeout) + 5
    assert triton["init"] is True  # PID 1 reaps the stubs of a restarted Triton


def test_triton_ports_stay_internal(triton):
    assert "ports" not in triton
    environment = triton["environment"]
    ports = {environment[f"IEI_TRITON_{kind}_PORT"] for kind in ("HTTP", "GRPC", "METRICS")}
    assert set(triton["expose"]) == ports == {"8000", "8001", "8002"}


def test_the_ports_override_publishes_triton_s_three_ports(triton):
    published = load_compose("docker-compose.triton-ports.yml")["services"]["triton"]["ports"]
    container_ports = {mapping.rsplit(":", 1)[1] for mapping in published}
    assert container_ports == set(triton["expose"])


@pytest.mark.parametrize(
    ("service", "expected"),
    [("triton", triton_container), ("frontend", frontend_container)],
)
def test_every_setting_read_in_a_service_passes_through_from_the_shell_or_env_file(
    compose, service, expected
):
    environment = compose[service]["environment"]
    for name in expected():
        assert name in environment, f"{service} lacks {name}"
        # unset or empty: the table's default (never a default written here, a key least of all)
        assert environment[name] == f"${{{name}:-}}", f"{service}: {name}={environment[name]}"


def test_every_variable_in_compose_is_in_the_settings_table_and_read_where_it_is_set(compose):
    readers = {"triton": {table.LAUNCHER, table.MODEL}, "frontend": {table.SERVER}}
    for name, service in compose.items():
        for variable in service["environment"]:
            if not variable.startswith(("IEI_", "IMAGE_EMBEDDING_MODEL")):
                continue  # HF_TOKEN and the like belong to other software
            entry = table.by_env(variable)
            assert entry is not None, f"{name}: {variable} is not a setting"
            read_here = readers[name] & set(entry.readers) or variable in IMAGE_COMMAND_READS
            assert read_here, f"{name}: {variable} is set but nothing in it reads it"


def test_triton_s_arguments_from_compose_agree_with_its_healthcheck(triton, monkeypatch):
    for name, value in triton["environment"].items():
        monkeypatch.setenv(name, interpolate(value))
    argv = triton_command(LauncherSettings(), Path("/repo"))
    assert "--http-address=0.0.0.0" in argv  # reachable from the frontend's container
    test = " ".join(triton["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/v2/health/ready" in test
    assert "--http-port=8000" in argv
    assert triton["healthcheck"]["start_period"] == "15m"  # model downloads take minutes
    # `iei triton` waits nearly that long for the model, and says so itself when it gives up
    assert 13 * 60 <= LauncherSettings().startup_timeout < 15 * 60


def test_frontend_waits_for_a_healthy_triton_and_finds_it_by_name(triton, frontend):
    assert frontend["depends_on"] == {"triton": {"condition": "service_healthy"}}
    url = frontend["environment"]["IEI_TRITON_URL"]
    assert url == f"triton:{triton['environment']['IEI_TRITON_HTTP_PORT']}"
    assert LauncherSettings(triton_url=url).triton_endpoint == url
    metrics = frontend["environment"]["IEI_TRITON_METRICS_URL"]
    assert metrics == f"triton:{triton['environment']['IEI_TRITON_METRICS_PORT']}"
    assert ServerSettings(triton_metrics_url=metrics).triton_metrics_url == metrics


def test_frontend_is_published_on_the_port_uvicorn_listens_on(frontend):
    [mapping] = frontend["ports"]
    host_port, container_port = interpolate(mapping).rsplit(":", 1)
    assert host_port == container_port == "8000"
    command = shlex.split(cmd_of("frontend.Dockerfile")[-1])
    assert command[command.index("--port") + 1] == container_port
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "iei.server.app:create_app" in command and "--factory" in command
    assert command[command.index("--workers") + 1] == "$workers"


def image_command_env(tmp_path: Path) -> dict[str, str]:
    """The environment to run the frontend image's command here: a stand-in uvicorn that prints
    its arguments, and `python` this test's (the image's has the package installed)."""
    (tmp_path / "bin").mkdir()
    for name, script in (
        ("uvicorn", 'printf "%s\\n" "$@"'),
        ("python", f'exec "{sys.executable}" "$@"'),
    ):
        (tmp_path / "bin" / name).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / "bin" / name).chmod(0o755)
    return {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "m"),
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [("IEI_CONCURRENCY_LEVEL", "0"), ("IEI_WORKERS", "two"), ("IEI_WORKERS", "0"),
     ("IEI_WORKERS", "65")],
)  # fmt: skip
def test_the_frontend_images_command_stops_on_an_invalid_setting_before_uvicorn(
    tmp_path, name, value
):
    """In uvicorn's workers the settings check exits a worker, which uvicorn's supervisor
    restarts over and over: the image checks them before it starts uvicorn, IEI_WORKERS (which
    its command hands to uvicorn) as `iei serve` does."""
    env = {**image_command_env(tmp_path), name: value}
    out = subprocess.run(cmd_of("frontend.Dockerfile"), env=env, capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""  # uvicorn never ran
    [line] = out.stderr.splitlines()
    assert f"invalid setting {name}: " in line, out.stderr


@pytest.mark.parametrize(
    ("value", "workers"),
    [
        (None, CPU_HOST_WORKERS),
        ("", CPU_HOST_WORKERS),
        ("auto", CPU_HOST_WORKERS),
        (" AUTO ", CPU_HOST_WORKERS),
        ("3", 3),
        (" 3 ", 3),
    ],
)
def test_the_frontend_images_command_counts_workers_as_iei_serve_does(tmp_path, value, workers):
    """The image's shell command, run with a stand-in uvicorn: IEI_WORKERS=auto (or unset, or
    empty as compose passes it; spaces and case as `iei serve` reads them) is `iei serve`'s
    count for a host without a GPU."""
    env = image_command_env(tmp_path)
    if value is not None:
        env["IEI_WORKERS"] = value
    out = subprocess.run(cmd_of("frontend.Dockerfile"), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    arguments = out.stdout.split("\n")
    assert arguments[arguments.index("--workers") + 1] == str(workers)
    assert (tmp_path / "m").is_dir()


def test_the_cpu_variant_has_no_gpu_and_renders_cpu_instances(triton, monkeypatch, tmp_path):
    override = load_compose("docker-compose.cpu.yml")["services"]["triton"]
    merged = merge(triton, override)
    assert "deploy" not in merged
    assert merged["command"] == ["iei", "triton"]
    for name, value in merged["environment"].items():
        monkeypatch.setenv(name, interpolate(value))
    assert gpu_count() == 0
    target = render_model_repository(
        DEFAULT_MODEL_REPOSITORY, tmp_path / "repo", gpus=gpu_count(), instances=None
    )
    config = text_format.Parse(
        (target / "iei" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    kinds = {group.kind for group in config.instance_group}
    assert kinds == {model_config_pb2.ModelInstanceGroup.KIND_CPU}


# --- Dockerfiles and what they install --------------------------------------------------------


def test_base_images_are_pinned():
    images = {
        name: [args.split()[0] for instruction, args in dockerfile(name) if instruction == "FROM"]
        for name in ("triton.Dockerfile", "frontend.Dockerfile")
    }
    assert images["triton.Dockerfile"] == [NGC_TRITON]
    [python] = images["frontend.Dockerfile"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", python), python


def test_the_frontend_image_installs_the_server_extra_without_torch():
    steps = dockerfile("frontend.Dockerfile")
    installs = [args for instruction, args in steps if instruction == "RUN" and "pip" in args]
    assert len(installs) == 1 and '".[server]"' in installs[0] and "torch" not in installs[0]
    constraints = {
        canonicalize_name(r.name): r for r in requirements(DOCKER / "frontend-constraints.txt")
    }
    assert not {"torch", "torchvision", "transformers"} & set(constraints)
    server = PYPROJECT["project"]["optional-dependencies"]["server"]
    for dependency in map(Requirement, [*PYPROJECT["project"]["dependencies"], *server]):
        pinned = constraints.get(canonicalize_name(dependency.name))
        assert pinned is not None, f"{dependency.name} has no pin in frontend-constraints.txt"
        assert dependency.specifier.contains(pin(pinned)), f"{pinned} vs {dependency}"


def test_the_triton_image_pins_what_model_py_and_iei_triton_import():
    pins = {r.name.lower(): pin(r) for r in requirements(DOCKER / "triton-requirements.txt")}
    # The image is a CUDA 12 deployment (any driver from R525): the serve-cu12 extra's pins.
    serve_extra = PYPROJECT["project"]["optional-dependencies"]["serve-cu12"]
    serve = {r.name.lower(): r for r in map(Requirement, serve_extra)}
    for name in ("torch", "torchvision", "nvidia-nvimgcodec-cu12"):
        assert pins[name] == pin(serve[name]), f"{name}: the image and the serve-cu12 extra differ"
    distribution = {
        "PIL": "pillow",
        "google": "protobuf",
        "pydantic_settings": "pydantic-settings",
        "nvidia": "nvidia-nvimgcodec-cu12",  # from nvidia import nvimgcodec
    }
    imported = set().union(*map(third_party_imports, MODEL_SOURCES)) - MODEL_PACKAGES
    for module in cli_modules():
        imported |= third_party_imports(module) - {"iei"}
    missing = {distribution.get(name, name).lower() for name in imported} - set(pins)
    assert not missing, f"imported but not in triton-requirements.txt: {missing}"


# 3.11 names in the standard library; the Triton image's Python is 3.10.
PYTHON_311_NAMES = {
    ("enum", "StrEnum"),
    ("asyncio", "timeout"),
    ("asyncio", "TaskGroup"),
    ("typing", "Self"),
    ("typing", "LiteralString"),
    ("typing", "Never"),
    ("typing", "assert_never"),
    ("datetime", "UTC"),
}


@pytest.mark.parametrize(
    "path", [*MODEL_SOURCES, *cli_modules()], ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_code_run_by_the_triton_image_runs_on_python_3_10(path):
    tree = ast.parse(path.read_text(), feature_version=(3, 10))  # new syntax fails here
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            used |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            used |= {(alias.name, "") for alias in node.names}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            used.add((node.value.id, node.attr))
    assert not used & (PYTHON_311_NAMES | {("tomllib", "")})
    assert "ExceptionGroup" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    keep = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()]
    keep = [pattern for pattern in keep if pattern and not pattern.startswith("#")]
    for name in ("triton.Dockerfile", "frontend.Dockerfile"):
        for instruction, args in dockerfile(name):
            if instruction == "COPY":
                for source in args.split()[:-1]:
                    assert (ROOT / source).exists(), source
                    top = source.split("/")[0] if not source.startswith("docker/") else "docker"
                    assert any(fnmatch(top, pattern) for pattern in keep), source


def context_before_install(name: str, into: Path) -> Path:
    """The files a Dockerfile has copied (under its WORKDIR) when it pip-installs the project
    (`pip install ... .` or `".[extra]"`): that folder, laid out as the image holds it."""
    workdir = Path("/")
    for instruction, args in dockerfile(name):
        if instruction == "WORKDIR":
            workdir = workdir / args
        elif instruction == "COPY":
            *sources, target = [a for a in args.split() if not a.startswith("--")]
            folder = into / (workdir / target).relative_to("/")
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, folder, dirs_exist_ok=True, ignore=IGNORED_IN_IMAGES)
                else:
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, folder / path.name)
        elif instruction == "RUN" and re.search(r"pip install [^&]*(\s\.|\"\.\[)", args):
            return into / workdir.relative_to("/")
    raise AssertionError(f"{name} does not pip-install the project")


IGNORED_IN_IMAGES = shutil.ignore_patterns("__pycache__", "*.egg-info")


@pytest.mark.parametrize("name", ["triton.Dockerfile", "frontend.Dockerfile", "ray.Dockerfile"])
def test_each_image_builds_the_package_from_what_it_copied(name, tmp_path):
    """The wheel needs model_repository/ (pyproject maps iei.model_repository to it): an image
    that copied only frontend/ failed at its pip install."""
    source = context_before_install(name, tmp_path / "image")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as files:
        assert "iei/model_repository/iei/1/model.py" in files.namelist()


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install -e .[dev])")
@pytest.mark.parametrize("name", ["triton.Dockerfile", "frontend.Dockerfile"])
def test_hadolint_finds_nothing(name):
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKER / name)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Named in the docs as what a run writes, not as a file of the repository.
WRITTEN_BY_RUNS = {"docs/benchmarks/gpu-rows.jsonl"}


def test_the_docs_name_files_that_exist():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "".join(path.read_text() for path in docs)
    folders = "docker|deploy|model_repository|docs|tests|examples|bench|frontend"
    named = set(re.findall(rf"(?<![\w/.])((?:{folders})/[\w./-]*\w)", text)) - WRITTEN_BY_RUNS
    named |= set(re.findall(r"\b(docker-compose[\w.-]*\.yml)\b", text))
    assert "docs/deploy.md" in (ROOT / "README.md").read_text()
    assert {"docker-compose.cpu.yml", "deploy/kubernetes/prometheus-adapter/values.yaml"} <= named
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert not missing, f"named in the docs but missing: {missing}"
