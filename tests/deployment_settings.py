"""Which settings each container of a deployment (compose, Kubernetes) must be given, from the
settings table: every setting its processes read, passed through from the operator, except the
few the deployment itself fixes."""

from __future__ import annotations

from iei import settings as table
from iei.launcher.frontend import auto_workers

# Fixed by the deployment, not the operator's to set: where Triton listens and where the frontend
# finds it, and the model repository baked into the Triton image.
FIXED = {
    "IEI_TRITON_HOST", "IEI_TRITON_HTTP_PORT", "IEI_TRITON_GRPC_PORT", "IEI_TRITON_METRICS_PORT",
    "IEI_TRITON_URL", "IEI_TRITON_METRICS_URL", "IEI_MODEL_REPOSITORY",
}  # fmt: skip
# Launcher settings of the frontend process that `iei serve` starts; in the frontend image its
# command reads IEI_WORKERS, and the port is the image's.
FRONTEND_PROCESS = {"IEI_WORKERS"}
NOT_IN_CONTAINERS = {"IEI_BIND"}


def triton_container() -> set[str]:
    """What `iei triton` and the model read."""
    read = {
        s.env for s in table.SETTINGS.values() if {table.LAUNCHER, table.MODEL} & set(s.readers)
    }
    return read - FIXED - FRONTEND_PROCESS - NOT_IN_CONTAINERS


def frontend_container() -> set[str]:
    """What the HTTP frontend reads, and its image's command."""
    return {s.env for s in table.read_by(table.SERVER).values()} - FIXED | FRONTEND_PROCESS


# The frontend's worst-case memory (docs/reliability.md, "The frontend's memory"): resident bytes
# per byte of a worker's budgets, as tests/server/test_memory.py measures them (the peak growth of
# one request: 4.3x a JSON body, plus its raw bytes, which the test's client shares; 3.6-3.8x URL
# downloads), rounded up, and the processes' own size (about 80 MiB each under load).
BODY_RESIDENT_FACTOR = 6
URL_RESIDENT_FACTOR = 4.5
PROCESS_BASELINE_MIB = 100  # each uvicorn worker, and uvicorn's supervising process


def frontend_worst_case_mib(settings: dict[str, str]) -> float:
    """Resident MiB of a frontend container whose every worker holds all it may (`settings`:
    the container's variables; an empty one is the default)."""

    def value(variable: str) -> int:
        entry = table.by_env(variable)
        assert entry is not None, variable
        given = settings.get(variable) or entry.default
        # The frontend image sees no GPU: its command counts IEI_WORKERS=auto as iei serve would.
        return auto_workers(cores=1, gpus=0) if given == "auto" else int(given)

    per_worker = (
        PROCESS_BASELINE_MIB * 2**20
        + BODY_RESIDENT_FACTOR * value("IEI_BODY_WORKER_MAX_BYTES")
        + URL_RESIDENT_FACTOR * value("IEI_URL_WORKER_MAX_BYTES")
        + value("IEI_CACHE_MB") * 2**20  # the content cache counts its entries' own overhead
    )
    return (value("IEI_WORKERS") * per_worker) / 2**20 + PROCESS_BASELINE_MIB
