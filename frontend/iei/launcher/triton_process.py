"""One `tritonserver` process for `iei serve`: its arguments, its environment, its health.

Triton 2.51 neither restarts a dead Python stub nor stops reporting the model ready, so the
process and its stubs are watched here (`problem`), for the supervisor to act on.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from ..contract import MODEL_NAME
from ..settings import MODEL, SETTINGS, read_by
from .errors import TritonStartupError
from .models import served_models
from .processes import die_with_parent, stop_process
from .repository import gpu_count, render_model_repository
from .settings import LauncherSettings
from .triton_install import TritonInstall, find_triton

log = logging.getLogger("iei")

# The model's own message when it cannot load (model.py, load_embedder).
MODEL_LOAD_FAILURE = re.compile(r"IEI cannot load model .*")


def triton_arguments(
    *,
    model_repository: str,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    models: Sequence[str] = (MODEL_NAME,),
    shm_prefix: str | None = None,
) -> list[str]:
    """Launch arguments of Triton, shared by `iei serve` and the container command."""
    arguments = [
        f"--model-repository={model_repository}",
        # The models are loaded by name: the repository also holds the code they share
        # (iei_runtime/), which is no model, and models that this deployment does not serve.
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in models),
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--exit-on-error=true",
        "--exit-timeout-secs=15",
        "--log-verbose=0",
        # Room for a batch of large encoded images without growing the region step by step.
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=python,shm-growth-byte-size=16777216",
    ]
    if shm_prefix:
        # Our own prefix, so that regions left by a killed stub can be removed.
        arguments.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
    return arguments


def triton_command(
    settings: LauncherSettings, model_repository: Path, models: Sequence[str] = (MODEL_NAME,)
) -> list[str]:
    """argv of `iei triton`: a `tritonserver` on PATH (NGC image) alone, with the same arguments."""
    return [
        "tritonserver",
        *triton_arguments(
            model_repository=str(model_repository),
            host=settings.triton_host,
            http_port=settings.triton_http_port,
            grpc_port=settings.triton_grpc_port,
            metrics_port=settings.triton_metrics_port,
            models=models,
        ),
    ]


def model_environment(settings: LauncherSettings) -> dict[str, str]:
    """Every setting the model reads (the table's MODEL readers), as validated here; a local
    model folder becomes an absolute path (Triton's working directory is not ours)."""
    environment = {}
    for name, entry in read_by(MODEL).items():
        value = getattr(settings, name)
        if value is not None:
            environment[entry.env] = str(value).lower() if isinstance(value, bool) else str(value)
    model = settings.embedding_model
    local = Path(model).expanduser()
    if local.exists():
        environment[SETTINGS["embedding_model"].env] = str(local.resolve())
    elif model.startswith((".", "/", "~")):
        raise TritonStartupError(f"IMAGE_EMBEDDING_MODEL={model}: no such folder")
    return environment


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z, ...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def python_stubs(parent: int) -> list[int]:
    """Living Python-backend stub processes that `parent` (tritonserver) started."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if (
            int(fields[1]) == parent
            and fields[0] != "Z"
            and b"triton_python_backend_stub" in command
        ):
            stubs.append(int(entry.name))
    return stubs


class TritonServer:
    """One `tritonserver` process with the `iei` model (and `iei_text` for a dual encoder), its
    log in `work_dir/triton.log`."""

    def __init__(self, settings: LauncherSettings, work_dir: Path) -> None:
        self.settings = settings
        self.work_dir = work_dir
        self.log_path = work_dir / "triton.log"
        self.shm_prefix = f"iei-{os.getpid()}-"
        self.process: subprocess.Popen[bytes] | None = None
        self.stubs: list[int] = []  # the model instances' processes, once the model is ready
        self.install: TritonInstall | None = None  # assembled once: a restart reuses it
        self.models: tuple[str, ...] = ()  # decided once, from the model's config.json

    @property
    def url(self) -> str:
        host = self.settings.triton_host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 (a mapping, not a bind)
        return f"http://{host}:{self.settings.triton_http_port}"

    def start(self) -> None:
        model_env = model_environment(self.settings)
        install = self.install = self.install or find_triton(self.work_dir)
        if not self.models:
            self.models = served_models(self.settings.embedding_model, self.settings.repository)
            log.info("Triton models: %s", ", ".join(self.models))
        repository = self.work_dir / "model_repository"
        if not repository.exists():
            render_model_repository(
                self.settings.repository,
                repository,
                gpus=gpu_count(),
                instances=self.settings.triton_instances,
            )
        command = [
            str(install.binary),
            *triton_arguments(
                model_repository=str(repository),
                host=self.settings.triton_host,
                http_port=self.settings.triton_http_port,
                grpc_port=self.settings.triton_grpc_port,
                metrics_port=self.settings.triton_metrics_port,
                models=self.models,
                shm_prefix=self.shm_prefix,
            ),
        ]
        if install.backend_directory:
            command.append(f"--backend-directory={install.backend_directory}")
        env = {**os.environ, **model_env}
        # The stub imports this environment's packages when its bin comes first on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if install.library_path:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [*install.library_path, env.get("LD_LIBRARY_PATH", "")]
            ).rstrip(os.pathsep)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(  # noqa: S603 (our own argv, no shell)
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our signal handler decides when Triton stops
                preexec_fn=die_with_parent,
            )
        log.info("started Triton (pid %d), log: %s", self.process.pid, self.log_path)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def watch_stubs(self) -> None:
        """Remember the stubs serving the model (call once it is ready: while it loads, a
        short-lived stub comes and goes, which is no crash)."""
        self.stubs = python_stubs(self.process.pid) if self.process else []

    def problem(self) -> str | None:
        """Why Triton cannot serve, or None. Triton 2.51 neither restarts a dead stub nor stops
        reporting the model ready, so a dead stub (gone, or a zombie) is looked for here."""
        if not self.running():
            return f"Triton exited: {self.failure_reason()}"
        for pid in self.stubs:
            if process_state(pid) in (None, "Z"):
                return f"the model's Python stub (pid {pid}) died"
        return None

    def wait_ready(self, timeout: float, should_stop: object = None) -> None:
        """Poll the models' readiness until `timeout`, failing at once if Triton exits."""
        deadline = time.monotonic() + timeout
        waiting = [f"{self.url}/v2/models/{name}/ready" for name in self.models or (MODEL_NAME,)]
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.running():
                    raise TritonStartupError(self.failure_reason())
                if callable(should_stop) and should_stop():
                    raise TritonStartupError("stopped before Triton was ready")
                with contextlib.suppress(httpx.HTTPError):
                    waiting = [url for url in waiting if client.get(url).status_code != 200]
                if not waiting:
                    return
                time.sleep(0.25)
        raise TritonStartupError(
            f"the model was not ready after {timeout:.0f} s (IEI_STARTUP_TIMEOUT); "
            f"Triton's log: {self.log_path}"
        )

    def failure_reason(self) -> str:
        """The one line of Triton's log that says why it stopped."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found = MODEL_LOAD_FAILURE.search(text)
        if found:  # Triton's log writes the Python traceback's newlines as a literal \n
            return found.group(0).split("\\n")[0].strip().rstrip("\"'")
        errors = [line for line in text.splitlines() if line.startswith("E")]
        last = errors[-1] if errors else "no output"
        return f"Triton exited with code {self.process and self.process.poll()}: {last[:300]}"

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGINT, timeout, name="Triton")
        for region in glob.glob(f"/dev/shm/{self.shm_prefix}*"):  # noqa: S108 (our own regions)
            Path(region).unlink(missing_ok=True)
