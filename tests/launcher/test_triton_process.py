"""How `iei serve` prepares Triton: the binary, the rendered repository, arguments, errors."""

from __future__ import annotations

import http.server
import json
import os
import struct
import sys
import time

import pytest
from google.protobuf import text_format
from iei.contract import EXECUTION_CLOCK_FORMAT
from iei.launcher.errors import TritonStartupError
from iei.launcher.repository import gpu_count, render_model_repository, shipped_model_repository
from iei.launcher.settings import LauncherSettings
from iei.launcher.triton_install import find_triton
from iei.launcher.triton_process import (
    TritonServer,
    instance_stub_model,
    model_environment,
    triton_arguments,
)
from stack import local_http_server
from tritonclient.grpc import model_config_pb2

DEFAULT_MODEL_REPOSITORY = shipped_model_repository()

KIND = model_config_pb2.ModelInstanceGroup


def rendered(tmp_path, **options):
    target = render_model_repository(DEFAULT_MODEL_REPOSITORY, tmp_path / "repo", **options)
    text = (target / "iei" / "config.pbtxt").read_text()
    return target, text_format.Parse(text, model_config_pb2.ModelConfig())


def test_without_a_gpu_the_instances_run_on_the_cpu(tmp_path):
    target, config = rendered(tmp_path, gpus=0, instances=None)
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND.KIND_CPU, 1)]
    assert (target / "iei" / "1" / "model.py").is_file()
    assert config.max_batch_size == 64  # everything else is kept


def test_with_gpus_the_committed_group_stays_and_counts_apply(tmp_path):
    _, config = rendered(tmp_path, gpus=2, instances=3)
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND.KIND_GPU, 3)]


@pytest.mark.parametrize(("gpus", "kind"), [(0, KIND.KIND_CPU), (1, KIND.KIND_GPU)])
def test_every_model_of_the_repository_is_rendered(tmp_path, gpus, kind):
    target, _ = rendered(tmp_path, gpus=gpus, instances=2)
    text = (target / "iei_text" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == "iei_text"
    assert [(g.kind, g.count) for g in config.instance_group] == [(kind, 2)]
    assert (target / "iei_text" / "1" / "model.py").is_file()
    assert (target / "iei_runtime" / "families.py").is_file()


def test_a_repository_without_the_model_is_refused(tmp_path):
    with pytest.raises(TritonStartupError, match=r"no iei/config\.pbtxt"):
        render_model_repository(tmp_path, tmp_path / "out", gpus=0, instances=None)


@pytest.mark.parametrize(("visible", "expected"), [("", 0), ("-1", 0), (None, None)])
def test_gpu_count_honours_cuda_visible_devices(monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    count = gpu_count()
    assert count >= 0 if expected is None else count == expected


def test_arguments_bind_the_ports_and_name_the_shm_prefix():
    arguments = triton_arguments(
        model_repository="/repo",
        host="127.0.0.1",
        http_port=1,
        grpc_port=2,
        metrics_port=3,
        shm_prefix="iei-7-",
    )
    assert "--model-repository=/repo" in arguments
    assert "--http-address=127.0.0.1" in arguments
    assert {"--http-port=1", "--grpc-port=2", "--metrics-port=3"} <= set(arguments)
    assert "--backend-config=python,shm-region-prefix-name=iei-7-" in arguments


def test_local_model_folders_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    env = model_environment(LauncherSettings(IMAGE_EMBEDDING_MODEL="./my-model", dtype="float32"))
    assert env["IMAGE_EMBEDDING_MODEL"] == str(tmp_path / "my-model")
    assert env["IEI_DTYPE"] == "float32"
    hub = model_environment(LauncherSettings(IMAGE_EMBEDDING_MODEL="google/vit-base-patch16-224"))
    assert hub["IMAGE_EMBEDDING_MODEL"] == "google/vit-base-patch16-224"
    with pytest.raises(TritonStartupError, match="no such folder"):
        model_environment(LauncherSettings(IMAGE_EMBEDDING_MODEL="./missing"))


def test_the_wheels_triton_gets_a_python_backend_for_this_python(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no tritonserver on PATH
    install = find_triton(tmp_path)
    assert install.binary.name == "tritonserver" and os.access(install.binary, os.X_OK)
    backend = tmp_path / "backends" / "python"
    assert install.backend_directory == tmp_path / "backends"
    assert (backend / "libtriton_python.so").is_file()
    assert (backend / "triton_python_backend_stub").is_file()
    assert install.library_path[0] == __import__("sysconfig").get_config_var("LIBDIR")


def test_failure_reason_is_the_models_own_line(tmp_path):
    server = TritonServer(LauncherSettings(), tmp_path)
    server.log_path.write_text(
        "I1128 model loading\n"
        "E1128 failed to load 'iei' version 1: Internal: RuntimeError: IEI cannot load model "
        "'x' (IMAGE_EMBEDDING_MODEL): no config.json\\n\\nAt:\\n  model.py(1): initialize\n"
    )
    assert server.failure_reason() == (
        "IEI cannot load model 'x' (IMAGE_EMBEDDING_MODEL): no config.json"
    )


def test_failure_reason_skips_the_harmless_nvml_lines_and_names_the_model(tmp_path):
    """Seen on every CPU host: the NVML/DCGM lines come after the model's failure."""
    server = TritonServer(LauncherSettings(), tmp_path)
    server.log_path.write_text(
        'E1128 18:38:09.815781 31732 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        'E1128 18:38:17.348598 31732 backend_model.cc:692] "ERROR: Failed to create instance: '
        'ValueError: no CLS token\\n\\nAt:\\n  pooling.py(25): pool"\n'
        "E1128 18:38:17.348727 31732 model_lifecycle.cc:642] \"failed to load 'iei' version 1: "
        "Internal: ValueError: a convolutional model has no CLS token; use IEI_POOLING=mean"
        '\\n\\nAt:\\n  pooling.py(25): pool"\n'
        "Error: Failed to initialize NVML\n"
        'W1128 18:38:17.349666 31732 metrics.cc:798] "DCGM unable to start"\n'
    )
    assert server.failure_reason() == (
        "model 'iei' failed to load: ValueError: a convolutional model has no CLS token; "
        "use IEI_POOLING=mean"
    )


def test_failure_reason_without_a_model_failure_is_triton_s_last_real_error(tmp_path):
    server = TritonServer(LauncherSettings(), tmp_path)
    server.log_path.write_text(
        'E1128 18:38:09.815781 31732 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        'E1128 18:38:10.000000 31732 http_server.cc:100] "failed to bind port 8100"\n'
        "Error: Failed to initialize NVML\n"
    )
    assert server.failure_reason().endswith(": failed to bind port 8100")


def test_failure_reason_without_an_error_line_is_triton_s_plain_error(tmp_path):
    """A failure Triton prints as it exits, not as a log line of its own: the message said 'no
    error in its log'."""
    server = TritonServer(LauncherSettings(), tmp_path)
    server.log_path.write_text(
        "I1128 18:38:09.000000 31732 server.cc:100] started\n"
        "Error: Failed to initialize NVML\n"
        "error: creating server: Internal - failed to start GRPC service\n"
    )
    assert server.failure_reason().endswith(
        ": creating server: Internal - failed to start GRPC service"
    )


def test_tritons_environment_carries_the_openmp_defaults_unless_the_user_set_them():
    from iei.launcher.triton_process import triton_environment

    env = triton_environment({"PATH": "/usr/bin"}, {"IEI_DTYPE": "auto"}, ["/triton/lib"])
    assert env["GOMP_SPINCOUNT"] == "30000"
    assert env["IEI_DTYPE"] == "auto"
    assert env["PATH"] == f"{os.path.dirname(sys.executable)}{os.pathsep}/usr/bin"
    assert env["LD_LIBRARY_PATH"] == "/triton/lib"
    mine = triton_environment({"GOMP_SPINCOUNT": "300000", "LD_LIBRARY_PATH": "/x"}, {})
    assert mine["GOMP_SPINCOUNT"] == "300000"
    assert mine["LD_LIBRARY_PATH"] == "/x"


def stub_argv(model: str, name: str) -> list:
    """A stub's command line as Triton 2.51 starts it (see instance_stub_model)."""
    arguments = ["/b/python/triton_python_backend_stub", f"/r/{model}/1/model.py",
                 "iei-1-region", "16777216", "16777216", "7", "/b/python", "336", name, "DEFAULT",
                 ""]  # fmt: skip
    return [a.encode() for a in arguments]


@pytest.mark.parametrize(
    ("argv", "model"),
    [
        (stub_argv("iei", "iei_0_0"), "iei"),  # an instance's stub
        (stub_argv("iei_text", "iei_text_0_1"), "iei_text"),
        (stub_argv("iei", "iei"), None),  # the auto-complete stub: it exits once it has answered
        ([b"bash", b"-c", b" exec /b/python/triton_python_backend_stub /r/iei/1/model.py"], None),
        ([b"/usr/bin/python3", b"/r/iei/1/model.py"], None),
        ([], None),
    ],
)
def test_only_the_stubs_of_model_instances_are_watched(argv, model):
    assert instance_stub_model(argv) == model


class ProbedServer(TritonServer):
    """A TritonServer whose probe fails as told after `wait` seconds, the model's processes using
    `share` of a core and answering `completes` other requests meanwhile."""

    PROBE_TIMEOUT = 0.01

    def __init__(
        self, tmp_path, failure: str | None, share: float, wait: float = 0.01, completes: int = 0
    ) -> None:
        super().__init__(LauncherSettings(), tmp_path)
        self.failure, self.share, self.wait, self.cpu = failure, share, wait, 0.0
        self.completes, self.answered = completes, 0
        self.stubs = {os.getpid(): "iei"}  # alive
        self.running = lambda: True  # type: ignore[method-assign]

    def probe(self) -> str | None:
        started = time.monotonic()
        time.sleep(self.wait)
        self.cpu += self.share * (time.monotonic() - started)
        self.answered += self.completes
        return self.failure

    def stubs_cpu_seconds(self) -> float:
        return self.cpu

    def completed(self) -> int | None:
        return self.answered

    def problems(self, probes: int) -> list[str | None]:
        found = []
        for _ in range(probes):
            self.next_probe = 0.0
            problem = self.problem()
            found.append(None if problem is None else str(problem))
        return found


def test_a_probe_held_behind_an_execution_that_computes_is_no_failure(tmp_path):
    """64 images of 50 MP take tens of seconds: the model is busy, not broken, for 3 minutes."""
    server = ProbedServer(tmp_path, "no answer within 10 s", share=0.9)
    found = server.problems(server.BUSY_PROBES + server.PROBE_FAILURES - 1)
    assert found[:-1] == [None] * (len(found) - 1)
    assert "computing for 200 s without answering" in (found[-1] or "")


def test_a_probe_held_while_nothing_computes_is_a_failure(tmp_path):
    """A hung stub (a deadlock) uses no CPU: three held probes and Triton is restarted."""
    server = ProbedServer(tmp_path, "no answer within 10 s", share=0.01)
    assert server.problems(3) == [None, None, "the model failed 3 probes in a row (no answer "
                                  "within 10 s)"]  # fmt: skip


@pytest.mark.parametrize("share", [0.9, 0.0])  # a CPU's forward pass, a GPU's (a wait)
def test_held_probes_while_the_model_completes_executions_are_no_failure_however_long(
    tmp_path, share
):
    """Executions of 27 s one after another (64 images on a CPU without AMX) hold every probe, the
    next execution's batch taking it in: the model is busy, not broken, for an hour if need be."""
    server = ProbedServer(tmp_path, "no answer within 10 s", share=share, completes=1)
    assert server.problems(3 * (server.BUSY_PROBES + server.PROBE_FAILURES)) == [None] * 63


def test_completed_executions_are_counted_from_probe_to_probe(tmp_path):
    """Progress is what completed since the previous probe: the first probe has nothing to compare
    with, and a Triton that stops answering its statistics shows none."""
    server = ProbedServer(tmp_path, "no answer within 10 s", share=0.0, completes=1)
    server.completed = lambda: None  # type: ignore[method-assign]
    assert server.problems(3)[-1] == "the model failed 3 probes in a row (no answer within 10 s)"


def test_a_probe_the_model_fails_at_once_is_a_failure_however_busy(tmp_path):
    """A lost CUDA context fails every execution at once: they complete, but the model is broken."""
    server = ProbedServer(tmp_path, "HTTP 500: CUDA error", share=0.9, wait=0.0, completes=1)
    assert server.problems(3)[-1] == "the model failed 3 probes in a row (HTTP 500: CUDA error)"


def test_only_the_probed_model_s_processes_count_as_its_work(tmp_path):
    """Another model computing says nothing of `iei`, which the probe asks."""
    server = TritonServer(LauncherSettings(), tmp_path)
    server.stubs = {os.getpid(): "iei__dino"}  # this process stands in for a stub
    assert server.stubs_cpu_seconds() == 0.0
    for model in ("iei", "iei_preprocess", "iei_encoder"):
        server.stubs = {os.getpid(): model}
        assert server.stubs_cpu_seconds() > 0.0


def test_progress_is_what_the_probed_model_answered_not_its_steps_work(tmp_path):
    """In the split layout the probe goes to the ensemble `iei`: its preprocessing step goes on
    completing executions (the probes' own) while a hung encoder answers none, so only `iei`'s
    successes say that the model answers; another model's say nothing of it."""

    def stats(name: str, success: int, executions: int) -> dict:
        return {"name": name, "version": "1", "execution_count": executions,
                "inference_stats": {"success": {"count": success, "ns": 1}}}  # fmt: skip

    class Stats(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            every = [stats("iei", 5, 5), stats("iei_preprocess", 100, 100),
                     stats("iei_encoder", 0, 0), stats("iei__dino", 7, 7)]  # fmt: skip
            named = self.path.removeprefix("/v2/models/").removesuffix("/stats")
            chosen = [s for s in every if s["name"] == named or self.path == "/v2/models/stats"]
            body = json.dumps({"model_stats": chosen}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with local_http_server(Stats) as url:
        port = int(url.rsplit(":", 1)[1])
        server = TritonServer(LauncherSettings(triton_http_port=port), tmp_path)
        assert server.completed() == 5
    assert server.completed() is None  # Triton gone: no progress can be read


class StubbedServer(TritonServer):
    """A running TritonServer whose stubs (pid -> Triton model) and dead pids are set by hand."""

    def __init__(self, tmp_path, monkeypatch, stubs: dict[int, str]) -> None:
        super().__init__(LauncherSettings(), tmp_path)
        self.living, self.dead = dict(stubs), set()
        self.models = ("iei",)  # pinned: loaded at start
        self.states: dict[str, str | None] = {}  # Triton's index: READY unless set
        self.running = lambda: True  # type: ignore[method-assign]
        self.process = type("Process", (), {"pid": 1})()  # type: ignore[assignment]
        self.next_probe = float("inf")  # no probe here
        monkeypatch.setattr(
            "iei.launcher.triton_process.python_stubs",
            lambda parent: {pid: m for pid, m in self.living.items() if pid not in self.dead},
        )
        monkeypatch.setattr(
            "iei.launcher.triton_process.process_state",
            lambda pid: None if pid in self.dead or pid not in self.living else "S",
        )

    def model_state(self, model: str) -> str | None:
        return self.states.get(model, "READY")


def test_the_stubs_of_a_model_still_loading_are_not_watched(tmp_path, monkeypatch):
    """A model loading on demand whose load fails: its stubs exit. Watched from the moment its
    first step was READY, they restarted Triton, the pinned models with it."""
    server = StubbedServer(tmp_path, monkeypatch, {10: "iei", 20: "iei__x_preprocess",
                                                   21: "iei__x_encoder"})  # fmt: skip
    server.watch_stubs(ready={"iei", "iei__x_preprocess"})
    assert server.stubs == {10: "iei", 20: "iei__x_preprocess"}
    server.dead.add(21)  # the encoder's load failed
    assert server.problem() is None


def test_a_model_loaded_again_has_its_new_stubs_watched_and_a_lost_stub_is_a_crash(
    tmp_path, monkeypatch
):
    server = StubbedServer(tmp_path, monkeypatch, {10: "iei", 11: "iei", 30: "iei__x"})
    server.watch_stubs()
    server.dead.add(30)
    server.living[31] = "iei__x"  # loaded again (two loads at once): the same count, new pids
    assert server.problem() is None
    assert server.stubs == {10: "iei", 11: "iei", 31: "iei__x"}
    server.dead.add(11)  # one of two instances' stubs died: nothing replaced it
    assert str(server.problem()) == "the Python stub of model iei (pid 11) died"


def test_the_stubs_of_an_unloaded_model_exit_without_a_restart(tmp_path, monkeypatch):
    """A model loaded on demand that someone unloaded (the frontend, to stay within
    IEI_MAX_LOADED_MODELS, or a client of Triton's own API) is no longer READY in Triton: its
    exited stubs are no crash. Before, any unload but the launcher's own restarted Triton."""
    server = StubbedServer(tmp_path, monkeypatch, {10: "iei", 30: "iei__x", 31: "iei__x"})
    server.watch_stubs()
    server.dead |= {30, 31}
    server.states["iei__x"] = "UNAVAILABLE"
    assert server.problem() is None
    assert server.stubs == {10: "iei"}


@pytest.mark.parametrize(
    ("dead", "state", "message"),
    [
        (30, "READY", "model iei__x (pid 30)"),  # Triton still has it: the stub was lost
        (30, None, "model iei__x (pid 30)"),  # Triton did not answer: nothing says unloaded
        (10, "UNAVAILABLE", "model iei (pid 10)"),  # a pinned model must stay loaded
    ],
)
def test_a_stub_is_lost_unless_triton_says_its_on_demand_model_was_unloaded(
    tmp_path, monkeypatch, dead, state, message
):
    server = StubbedServer(tmp_path, monkeypatch, {10: "iei", 30: "iei__x"})
    server.watch_stubs()
    server.dead.add(dead)
    server.states = {"iei": state, "iei__x": state}
    assert str(server.problem()) == f"the Python stub of {message} died"


def test_the_index_names_a_models_state_and_none_when_triton_is_silent(tmp_path):
    class Index(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.dumps([{"name": "iei", "version": "1", "state": "READY"},
                               {"name": "iei__x", "state": "UNAVAILABLE",
                                "reason": "unloaded"}]).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with local_http_server(Index) as url:
        server = TritonServer(LauncherSettings(triton_http_port=int(url.rsplit(":", 1)[1])),
                              tmp_path)  # fmt: skip
        assert (server.model_state("iei"), server.model_state("iei__x")) == ("READY", "UNAVAILABLE")
        assert server.model_state("iei__y") == ""  # not in the repository
    assert server.model_state("iei") is None


class ClockedServer(StubbedServer):
    """A StubbedServer whose stubs' execution clocks and CPU seconds are set by hand."""

    def __init__(self, tmp_path, monkeypatch, stubs: dict[int, str]) -> None:
        super().__init__(tmp_path, monkeypatch, stubs)
        self.clocks.mkdir(parents=True)
        self.cpu: dict[int, float] = dict.fromkeys(stubs, 1.0)
        monkeypatch.setattr("iei.launcher.triton_process.cpu_seconds", lambda pid: self.cpu[pid])
        self.watch_stubs()

    def executing(self, pid: int, began: float) -> None:
        (self.clocks / str(pid)).write_bytes(struct.pack(EXECUTION_CLOCK_FORMAT, began))

    def looked_at(self, pid: int, ago: float) -> None:
        """The last look that saw `pid` compute was `ago` seconds back."""
        began, cpu, _ = self.executing_since[pid]
        self.executing_since[pid] = (began, cpu, time.monotonic() - ago)


def test_an_instance_in_one_execution_without_computing_for_a_minute_is_hung(tmp_path, monkeypatch):
    """A deadlocked instance beside a working one: the probes, which the working one answers,
    never saw it."""
    server = ClockedServer(tmp_path, monkeypatch, {10: "iei", 11: "iei", 20: "iei_text"})
    began = time.monotonic() - 100
    server.executing(11, began)
    assert server.problem() is None  # first seen in it: from now on
    server.looked_at(11, 30)
    assert server.problem() is None
    server.looked_at(11, server.HUNG_AFTER)
    problem = server.problem()
    assert problem is not None and problem.reason == "stub_hung"
    assert str(problem) == ("an instance of model iei (pid 11) has been in one execution for "
                            "100 s, 60 s of them without computing")  # fmt: skip


def test_an_execution_that_computes_or_a_new_one_is_not_hung(tmp_path, monkeypatch):
    server = ClockedServer(tmp_path, monkeypatch, {10: "iei", 20: "iei_text"})
    server.executing(20, time.monotonic() - 300)  # 64 photos of 50 MP on 2 cores
    server.problem()
    server.looked_at(20, server.HUNG_AFTER)
    server.cpu[20] += 0.7  # it computed (above 1 % of a core over that minute)
    assert server.problem() is None
    server.looked_at(20, server.HUNG_AFTER)
    server.executing(20, time.monotonic())  # that one ended, another began
    assert server.problem() is None
    server.executing(20, 0.0)  # waiting for work however long is no hang
    assert server.problem() is None and 20 not in server.executing_since


def test_triton_s_output_is_read_to_its_end_when_a_copy_of_it_fails(tmp_path, monkeypatch, caplog):
    """The thread that copies Triton's output died on a write that failed (a closed stdout, a
    full disk); nothing read the pipe any more, and Triton blocked once it was full."""
    import io
    import types

    class Closed:
        name = "standard output"

        def write(self, data: bytes) -> int:
            raise OSError(5, "Input/output error")

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=Closed()))
    lines = [f"line {i}\n".encode() for i in range(1000)]
    output = io.BytesIO(b"".join(lines))
    server = TritonServer(LauncherSettings(), tmp_path)
    server._tee(types.SimpleNamespace(stdout=output))  # type: ignore[arg-type]
    assert output.read() == b""  # read to its end
    assert server.log_path.read_bytes() == b"".join(lines)  # the other copy kept every line
    assert caplog.text.count("Triton's output no longer goes to standard output") == 1
