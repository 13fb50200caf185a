"""One `tritonserver` process for `iei serve`: its arguments, its environment, its health.

Triton 2.51 neither restarts a dead Python stub nor stops reporting the model ready, so the
process and its stubs are watched here (`problem`), for the supervisor to act on.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..contract import (
    EXECUTION_CLOCK_FORMAT,
    EXECUTION_CLOCKS_ENV,
    INPUT_NAME,
    MODEL_NAME,
    MODEL_READY,
    OUTPUT_NAME,
    PROBE_IMAGE,
    PROBE_PRIORITY,
    STAGE_MODEL_NAMES,
    STUB_REGIONS,
    TRITON_RESTARTS_ENV,
)
from ..models import ServedModel
from ..settings import MODEL, SETTINGS, as_env_value, read_by
from .addresses import dial_endpoint, local_client, triton_addresses
from .errors import TritonStartupError
from .models import model_layout, served_models
from .processes import die_with_parent, process_state, remove_stale_regions, stop_process
from .repository import ModelPlan, gpu_count
from .settings import LauncherSettings
from .triton_install import TritonInstall, find_triton

log = logging.getLogger("iei")

# Triton's log: an error line (`E1128 18:38:17.348727 31732 file.cc:642] "message"`), and the
# one that names a model that failed to load, with its reason.
TRITON_ERROR = re.compile(r"^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] (.*)$")
PLAIN_ERROR = re.compile(r"^error: ", re.IGNORECASE)
FAILED_TO_LOAD = re.compile(r"failed to load '([\w-]+)' version \d+: \w+: (.*)")
# Error lines every CPU-only host prints.
HARMLESS = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "DCGM")


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
    address, grpc_address = triton_addresses(host)
    arguments = [
        f"--model-repository={model_repository}",
        # The models are loaded by name: the repository also holds the code they share
        # (iei_runtime/), which is no model, and models that this deployment does not serve.
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in models),
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--grpc-address={grpc_address}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={address}",
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
    settings: LauncherSettings,
    model_repository: Path,
    *,
    models: Sequence[str] = (MODEL_NAME,),
    binary: str = "tritonserver",
    shm_prefix: str | None = None,
) -> list[str]:
    """argv of Triton for these settings: `iei serve` and `iei triton` (the container command)
    both start it so."""
    return [
        binary,
        *triton_arguments(
            model_repository=str(model_repository),
            host=settings.triton_host,
            http_port=settings.triton_http_port,
            grpc_port=settings.triton_grpc_port,
            metrics_port=settings.triton_metrics_port,
            models=models,
            shm_prefix=shm_prefix,
        ),
    ]


# GNU OpenMP (torch's CPU threads): how long a thread of the forward pass spins waiting for more
# work before it sleeps. libgomp's 300,000 kept the team spinning after each forward pass, on
# the cores the decode threads needed next: the tiny model's CPU per image fell 13-25% with
# 30,000 and ViT-B/16's forward pass was no slower (docs/benchmarks.md). A value set by the
# user wins.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "30000"}


def triton_environment(
    environ: Mapping[str, str], model_env: Mapping[str, str], library_path: Sequence[str] = ()
) -> dict[str, str]:
    """tritonserver's environment (its stubs inherit it): this one, the model's settings, the
    OpenMP defaults, this Python's bin first on PATH (the stub imports its packages) and the
    Triton install's libraries."""
    env = {**OPENMP_DEFAULTS, **environ, **model_env}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if library_path:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [*library_path, env.get("LD_LIBRARY_PATH", "")]
        ).rstrip(os.pathsep)
    return env


def model_environment(settings: LauncherSettings) -> dict[str, str]:
    """Every setting the model reads (the table's MODEL readers), as validated here, for the
    default model; a local model folder becomes an absolute path (Triton's working directory is
    not ours)."""
    environment = {}
    for name, entry in read_by(MODEL).items():
        value = getattr(settings, name)
        if value is not None:
            environment[entry.env] = as_env_value(value)
    environment[SETTINGS["embedding_model"].env] = resolved_model_id(
        settings.default_model.model_id, "IEI_MODELS" if settings.models else None
    )
    return environment


def resolved_model_id(model: str, variable: str | None = None) -> str:
    """A local folder as an absolute path, a hub id as it is; a missing folder stops start-up."""
    local = Path(model).expanduser()
    if local.exists():
        return str(local.resolve())
    if model.startswith((".", "/", "~")):
        raise TritonStartupError(
            f"{variable or SETTINGS['embedding_model'].env}={model}: no such folder"
        )
    return model


def model_parameters(settings: LauncherSettings, model: ServedModel) -> dict[str, str]:
    """A served model's settings as config parameters: the global ones (the table's MODEL
    readers), then its own options (IEI_MODELS)."""
    parameters = model_environment(settings)
    parameters[SETTINGS["embedding_model"].env] = resolved_model_id(model.model_id, "IEI_MODELS")
    own = {"pooling": model.pooling, "dtype": model.dtype, "engine": model.engine}
    for name, value in own.items():
        if value is not None:
            parameters[SETTINGS[name].env] = value
    # config.pbtxt's parameter names are the model repository's (iei_runtime/settings.py).
    names = {entry.env: name for name, entry in read_by(MODEL).items()}
    names[SETTINGS["embedding_model"].env] = "model_id"
    return {names[env]: value for env, value in parameters.items() if value != ""}


def model_plans(settings: LauncherSettings, gpus: int) -> tuple[ModelPlan, ...]:
    """Each served model's Triton models: its layout and whether it has a text tower, from its
    config.json; its settings as parameters."""
    plans = []
    for model in settings.served:
        model_id = resolved_model_id(model.model_id, "IEI_MODELS" if settings.models else None)
        served = served_models(model_id, settings.repository, model.pooling or settings.pooling)
        layout = model_layout(settings.triton_layout, gpus, model_id, settings.repository)
        plans.append(ModelPlan(model, layout, served, model_parameters(settings, model)))
    return tuple(plans)


def startup_models(plans: Sequence[ModelPlan], idle_unload: float | None) -> tuple[str, ...]:
    """The Triton models loaded at start (and again after a restart): with IEI_MODEL_IDLE_UNLOAD
    the pinned models' only (the others load on their first request); without it, all."""
    return tuple(
        name for plan in plans if plan.model.pinned or idle_unload is None
        for name in plan.triton_models
    )  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) a process has used, 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def execution_began(clock: Path) -> float | None:
    """When the execution an instance is in began (CLOCK_MONOTONIC seconds), from its clock
    file; None while it waits, or without a clock (a model of another repository)."""
    try:
        with open(clock, "rb") as file:
            (began,) = struct.unpack(EXECUTION_CLOCK_FORMAT, file.read(8))
    except (OSError, struct.error):
        return None
    return began or None


def python_stubs(parent: int) -> dict[int, str]:
    """Living Python-backend stub processes of model instances that `parent` (tritonserver)
    started, each with the Triton model it serves."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z":
            model = instance_stub_model(command.split(b"\0"))
            if model is not None:
                stubs[int(entry.name)] = model
    return stubs


def instance_stub_model(argv: Sequence[bytes]) -> str | None:
    """The Triton model whose instance a stub's command line serves, or None for any other
    process, the short-lived stub that reads the model's auto-completed config included.

    The stub's arguments (Triton 2.51): the model file `<repository>/<model>/1/model.py`, its
    region, two sizes, the parent's pid, the backend folder, an IPC handle, then the instance's
    name (`<model>_<group>_<index>`), where the auto-complete stub has the model's own name; that
    stub can outlive the model's turn to ready by a moment on a loaded host, and watching it
    would read its exit as a crash."""
    if len(argv) < 9 or b"triton_python_backend_stub" not in argv[0]:
        return None
    model = Path(argv[1].decode(errors="replace")).parent.parent.name
    return None if argv[8].decode(errors="replace") == model else model


RESTART_REASONS = ("exited", "stub_died", "stub_hung", "probes_failed")


@dataclass(frozen=True)
class Problem:
    """Why Triton cannot serve: `reason` (one of RESTART_REASONS) labels the restarts in
    /metrics, `message` is what the log says."""

    reason: str
    message: str

    def __str__(self) -> str:
        return self.message


class TritonServer:
    """One `tritonserver` process with the `iei` model (and `iei_text` for a dual encoder), its
    log in `log_path` (a restart appends)."""

    PROBE_INTERVAL = 10.0  # seconds between real inferences that check the model answers
    PROBE_TIMEOUT = 10.0
    PROBE_FAILURES = 3  # failed probes in a row that make the model broken (within a minute)
    # A probe held past PROBE_TIMEOUT while the model's processes computed (BUSY_CPU of a core,
    # at least) waited behind a long execution, which is load, not a broken model: 64 images of
    # 50 MP take tens of seconds on 2 cores. A hung stub (a deadlock) computes nothing, and a
    # sticky CUDA error fails the probe at once; one execution that computes for BUSY_PROBES
    # probes in a row (3 minutes, then PROBE_FAILURES more: about 200 s) counts as broken after
    # all, which also bounds a stub that spins on a hung GPU kernel. A held probe is no failure
    # either when the model answered a request since the previous probe (Triton's statistics):
    # executions of 27 s each, one after another, are a busy model, however long.
    BUSY_CPU = 0.2
    BUSY_PROBES = 18
    # An instance in one execution that has not computed (HUNG_CPU of a core, at most) for
    # HUNG_AFTER seconds is hung: a deadlock. The probes miss one beside a working instance
    # (IEI_TRITON_INSTANCES >= 2), which answers them, and never look at the text model or the
    # other models. The longest execution measured here (64 photos of 50 MP on 2 cores) computes
    # throughout; one waiting on a GPU takes well under a second.
    HUNG_AFTER = 60.0
    HUNG_CPU = 0.01
    STATS_TIMEOUT = 2.0  # Triton's statistics are counters: they answer at once, however busy

    def __init__(
        self,
        settings: LauncherSettings,
        work_dir: Path,
        log_path: Path | None = None,
        *,
        echo: bool = False,
    ) -> None:
        self.settings = settings
        self.work_dir = work_dir
        self.log_path = log_path or work_dir / "triton.log"
        self.echo = echo  # Triton's output to our stdout too (a container's log)
        self.failed_probes = 0
        self.busy_probes = 0  # probes in a row held behind an execution that computes
        self.completed_seen: int | None = None  # the probed model's answers at the last probe
        self.next_probe = 0.0
        self.shm_prefix = f"{STUB_REGIONS}{os.getpid()}-"
        self.process: subprocess.Popen[bytes] | None = None
        # The model instances' processes (pid -> Triton model), once the models are ready.
        self.stubs: dict[int, str] = {}
        self.clocks = work_dir / "executions"  # their execution clocks (iei.contract)
        self.restarts = dict.fromkeys(RESTART_REASONS, 0)  # by the supervisor, by reason
        # pid -> (when its execution began, its CPU seconds and the time when it last computed)
        self.executing_since: dict[int, tuple[float, float, float]] = {}
        self.install: TritonInstall | None = None  # assembled once: a restart reuses it
        self.plans: tuple[ModelPlan, ...] = ()  # decided once, from the models' config.json
        self.models: tuple[str, ...] = ()  # the Triton models loaded at start (and restart)
        self.layout = "single"  # IEI_TRITON_LAYOUT resolved for the default model

    @property
    def url(self) -> str:
        """Where this Triton answers HTTP (not IEI_TRITON_URL: `iei triton` runs it anyway)."""
        return f"http://{dial_endpoint(self.settings.triton_host, self.settings.triton_http_port)}"

    def start(self) -> None:
        # The stubs' regions of an `iei serve` killed outright (its Triton got SIGKILL) are gone
        # only once someone removes them: the next one does.
        remove_stale_regions(STUB_REGIONS)
        model_env = model_environment(self.settings)
        install = self.install = self.install or find_triton(self.work_dir)
        self.plan()
        repository = self.work_dir / "model_repository"
        if not repository.exists():
            self.settings.render(repository, gpus=gpu_count(), models=self.plans)
        command = triton_command(
            self.settings, repository, models=self.models, binary=str(install.binary),
            shm_prefix=self.shm_prefix,
        )  # fmt: skip
        if install.backend_directory:
            command.append(f"--backend-directory={install.backend_directory}")
        env = triton_environment(os.environ, model_env, install.library_path)
        # Emptied: a stub killed in an execution (a restart) leaves its clock, which a new stub
        # given the same pid would be judged by until it writes its own.
        shutil.rmtree(self.clocks, ignore_errors=True)
        self.clocks.mkdir(parents=True)
        env[EXECUTION_CLOCKS_ENV] = str(self.clocks)
        env[TRITON_RESTARTS_ENV] = ",".join(f"{r}={n}" for r, n in self.restarts.items())
        self.executing_since = {}
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(  # noqa: S603 (our own argv, no shell)
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.echo else log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our signal handler decides when Triton stops
                preexec_fn=die_with_parent,
            )
        if self.echo:
            threading.Thread(target=self._tee, args=(self.process,), daemon=True).start()
        self.failed_probes, self.busy_probes, self.completed_seen = 0, 0, None
        self.next_probe = time.monotonic() + self.PROBE_INTERVAL
        log.info("started Triton (pid %d), log: %s", self.process.pid, self.log_path)

    def plan(self) -> None:
        """Decide, once, what Triton serves: the models' layouts from their config.json (a hub
        lookup for a model id, which takes seconds offline)."""
        if self.plans:
            return
        self.plans = model_plans(self.settings, gpu_count())
        self.layout = self.plans[0].layout
        self.models = startup_models(self.plans, self.settings.model_idle_unload)
        for plan in self.plans:
            log.info(
                "model %r (%s): Triton models %s (%s layout)%s", plan.model.name,
                plan.model.model_id, ", ".join(plan.triton_models), plan.layout,
                "" if set(plan.triton_models) <= set(self.models) else ", loaded on demand",
            )  # fmt: skip

    def _tee(self, process: subprocess.Popen[bytes]) -> None:
        """Triton's output line by line to the log file and to our stdout. A copy that fails (a
        full disk, a closed stdout) is given up, never the reading: with no reader left, Triton
        blocked writing its log once the pipe was full."""
        with contextlib.ExitStack() as files:
            sinks: list[Any] = [sys.stdout.buffer]
            try:
                sinks.insert(0, files.enter_context(open(self.log_path, "ab")))
            except OSError as exc:
                log.warning("Triton's output is not written to %s: %s", self.log_path, exc)
            for line in process.stdout or ():
                for sink in list(sinks):
                    try:
                        sink.write(line)
                        sink.flush()
                    except (OSError, ValueError) as exc:  # ValueError: a closed file
                        sinks.remove(sink)
                        where = getattr(sink, "name", "standard output")
                        log.warning("Triton's output no longer goes to %s: %s", where, exc)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def watch_stubs(self, ready: set[str] | None = None) -> None:
        """Remember the stubs serving the models (call once they are ready: while one loads, a
        short-lived stub comes and goes, and a failed load's stubs exit, which is no crash).
        `ready`: only the stubs of these Triton models (others may be loading now)."""
        stubs = python_stubs(self.process.pid) if self.process else {}
        if ready is not None:
            stubs = {pid: model for pid, model in stubs.items() if model in ready}
        if stubs and set(stubs) != set(self.stubs):
            log.info("watching the model stubs (pids %s)", ", ".join(map(str, sorted(stubs))))
        self.stubs = stubs

    def replaced(self, model: str) -> bool:
        """Whether `model`'s stubs were replaced, not lost: loaded again (a load asked twice),
        its new stubs are as many as those watched. Then they are watched instead."""
        living = python_stubs(self.process.pid) if self.process else {}
        alive = {
            pid
            for pid, name in living.items()
            if name == model and process_state(pid) not in (None, "Z")
        }
        watched = [pid for pid, name in self.stubs.items() if name == model]
        if len(alive) < len(watched):
            return False
        self.stubs = {pid: name for pid, name in self.stubs.items() if name != model}
        self.stubs.update({pid: model for pid in alive})
        log.info("the stubs of model %s were replaced (loaded again): watching pids %s", model,
                 ", ".join(map(str, sorted(alive))))  # fmt: skip
        return True

    def unloaded(self, model: str) -> bool:
        """Whether `model`'s stubs exited because it was unloaded, not lost: it is loaded on
        demand and Triton no longer has it READY (a crashed stub's model stays READY in Triton
        2.51). The frontend unloads one to stay within IEI_MAX_LOADED_MODELS, and a client of
        Triton's own API may unload any. Then its stubs are no longer watched."""
        if model in self.models or self.model_state(model) in (None, MODEL_READY):
            return False  # a pinned model's, or Triton says nothing: lost
        log.info("model %s was unloaded: its stubs are no longer watched", model)
        self.forget_stubs([model])
        return True

    def model_state(self, model: str) -> str | None:
        """`model`'s state in Triton's repository index (READY, UNAVAILABLE...); None when
        Triton does not answer."""
        try:
            with local_client(self.STATS_TIMEOUT) as client:
                response = client.post(f"{self.url}/v2/repository/index")
            index = response.raise_for_status().json()
            return next((e.get("state", "") for e in index if e.get("name") == model), "")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    def forget_stubs(self, models: Sequence[str]) -> None:
        """Stop watching the stubs of `models`: they are being unloaded, so their stubs exit."""
        self.stubs = {pid: model for pid, model in self.stubs.items() if model not in models}

    def problem(self) -> Problem | None:
        """Why Triton cannot serve, or None. Triton 2.51 neither restarts a dead stub nor stops
        reporting the model ready, so a dead stub (gone, or a zombie) is looked for here; and
        every PROBE_INTERVAL a real inference (at the head of the queue) must succeed: a model
        stuck in an error (a sticky CUDA error) fails PROBE_FAILURES of them in a row."""
        if not self.running():
            return Problem("exited", f"Triton exited: {self.failure_reason()}")
        if not self.stubs:  # not seen yet when the model turned ready (it happens): look again
            self.watch_stubs()
        for pid, model in list(self.stubs.items()):
            if process_state(pid) not in (None, "Z") or model not in self.stubs.values():
                continue
            if not self.replaced(model) and not self.unloaded(model):
                return Problem("stub_died", f"the Python stub of model {model} (pid {pid}) died")
        hung = self.hung_stub()
        if hung is not None:
            return hung
        if time.monotonic() >= self.next_probe:
            self.next_probe = time.monotonic() + self.PROBE_INTERVAL
            failure = self.busy_or(self.timed_probe())
            self.failed_probes = self.failed_probes + 1 if failure else 0
            if failure and self.failed_probes >= self.PROBE_FAILURES:
                message = f"the model failed {self.failed_probes} probes in a row ({failure})"
                return Problem("probes_failed", message)
        return None

    def hung_stub(self) -> Problem | None:
        """A watched instance in one execution that has not computed for HUNG_AFTER seconds
        (its execution clock and its CPU time), or None."""
        now = time.monotonic()
        self.executing_since = {p: v for p, v in self.executing_since.items() if p in self.stubs}
        for pid, model in self.stubs.items():
            began = execution_began(self.clocks / str(pid))
            if began is None:
                self.executing_since.pop(pid, None)
                continue
            cpu = cpu_seconds(pid)
            seen = self.executing_since.get(pid)
            if seen is None or seen[0] != began or cpu - seen[1] >= self.HUNG_CPU * (now - seen[2]):
                self.executing_since[pid] = (began, cpu, now)  # a new execution, or it computed
            elif now - seen[2] >= self.HUNG_AFTER:
                return Problem(
                    "stub_hung",
                    f"an instance of model {model} (pid {pid}) has been in one execution for "
                    f"{now - began:.0f} s, {now - seen[2]:.0f} s of them without computing",
                )
        return None

    def timed_probe(self) -> tuple[str | None, float, bool]:
        """`probe()`; if it waited its whole timeout, the share of a core the model's processes
        used meanwhile and whether the model answered a request since the previous probe (else
        0 and False)."""
        before, started = self.stubs_cpu_seconds(), time.monotonic()
        failure = self.probe()
        waited = time.monotonic() - started
        progressed = self.progressed()
        if failure is None or waited < self.PROBE_TIMEOUT:
            return failure, 0.0, False
        return failure, (self.stubs_cpu_seconds() - before) / waited, progressed

    def busy_or(self, probed: tuple[str | None, float, bool]) -> str | None:
        """The probe's failure, unless it was held behind requests being answered, or an
        execution that computes."""
        failure, computed, progressed = probed
        if failure is not None and progressed:
            self.busy_probes = 0
            log.info(
                "the model is busy: a probe waited %g s while other requests were answered; not "
                "counted as a failure", self.PROBE_TIMEOUT,
            )  # fmt: skip
            return None
        if failure is None or computed < self.BUSY_CPU:
            self.busy_probes = 0
            return failure
        self.busy_probes += 1
        held = self.busy_probes * self.PROBE_INTERVAL
        if self.busy_probes >= self.BUSY_PROBES:
            return f"{failure}; computing for {held:g} s without answering"
        log.info(
            "the model is busy: a probe waited %g s behind an execution that computes (%.0f%% "
            "of a core); not counted as a failure",
            self.PROBE_TIMEOUT, 100 * computed,
        )  # fmt: skip
        return None

    def progressed(self) -> bool:
        """Whether the probed model answered a request since the last look (False when Triton's
        statistics do not say)."""
        count = self.completed()
        seen, self.completed_seen = self.completed_seen, count
        return count is not None and seen is not None and count > seen

    def completed(self) -> int | None:
        """The requests the probed model answered successfully, from Triton's statistics; None
        if Triton does not answer. `iei` alone, which in the split layout is the ensemble: it
        counts a request once both steps have answered it. Its steps' counts would not do: the
        preprocessing step goes on completing the probes while a hung encoder answers none."""
        try:
            with local_client(self.STATS_TIMEOUT) as client:
                response = client.get(f"{self.url}/v2/models/{MODEL_NAME}/stats")
            stats = response.raise_for_status().json().get("model_stats") or []
            return sum(
                int(s["inference_stats"]["success"]["count"])
                for s in stats
                if s.get("name") == MODEL_NAME
            )
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def stubs_cpu_seconds(self) -> float:
        """The CPU time of the probed model's processes (`iei`, or its stages in the split
        layout): another model's work says nothing of this one."""
        probed = (MODEL_NAME, *STAGE_MODEL_NAMES)
        return sum(cpu_seconds(pid) for pid, model in self.stubs.items() if model in probed)

    def probe(self) -> str | None:
        """One inference of a 1x1 PNG at the head of the queue: None, or why it failed. A full
        queue (Triton's 503) is load, not a broken model."""
        payload = len(PROBE_IMAGE).to_bytes(4, "little") + PROBE_IMAGE  # one BYTES element
        header = json.dumps({
            "inputs": [{"name": INPUT_NAME, "shape": [1, 1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(payload)}}],
            "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
            "parameters": {"priority": PROBE_PRIORITY},
        }).encode()  # fmt: skip
        try:
            with local_client(self.PROBE_TIMEOUT) as client:
                response = client.post(
                    f"{self.url}/v2/models/{MODEL_NAME}/infer",
                    content=header + payload,
                    headers={
                        "Inference-Header-Content-Length": str(len(header)),
                        "Content-Type": "application/octet-stream",
                    },
                )
        except httpx.TimeoutException:
            return f"no answer within {self.PROBE_TIMEOUT:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code in (200, 503):
            return None
        return f"HTTP {response.status_code}: {response.text[:200]}"

    def wait_ready(self, timeout: float, should_stop: object = None) -> None:
        """Poll the models' readiness until `timeout`, failing at once if Triton exits."""
        deadline = time.monotonic() + timeout
        waiting = [f"{self.url}/v2/models/{name}/ready" for name in self.models or (MODEL_NAME,)]
        with local_client(2.0) as client:
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
        """The one line of Triton's log that says why it stopped: a model's own load error
        first, then Triton's last error line. Lines of another form (`Error: Failed to initialize
        NVML`, which every host without a GPU prints) are not reasons."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        code = self.process.poll() if self.process else None
        found = FAILED_TO_LOAD.findall(text)
        if found:
            model, reason = found[-1]
            # Triton writes a Python traceback's newlines as a literal \n: the first line is
            # the exception, IEI's own one-line message included.
            reason = reason.split("\\n")[0].strip().rstrip("\"'")
            own = reason.find("IEI cannot load model")  # the model's own sentence says it all
            return reason[own:] if own >= 0 else f"model {model!r} failed to load: {reason}"
        lines = text.splitlines()
        errors = [m.group(1) for m in map(TRITON_ERROR.match, lines) if m]
        # Else its plain `error: …` lines (`error: creating server: …`, printed as it exits).
        errors = errors or [line.split(":", 1)[1] for line in lines if PLAIN_ERROR.match(line)]
        errors = [e for e in errors if not any(noise in e for noise in HARMLESS)]
        last = errors[-1].strip().strip('"') if errors else "no error in its log"
        return f"Triton exited with code {code}: {last[:300]}"

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGINT, timeout, name="Triton")
        for region in glob.glob(f"/dev/shm/{self.shm_prefix}*"):  # noqa: S108 (our own regions)
            Path(region).unlink(missing_ok=True)
