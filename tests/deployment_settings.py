"""Which settings each container of a deployment (compose, Kubernetes) must be given, from the
settings table: every setting its processes read, passed through from the operator, except the
few the deployment itself fixes."""

from __future__ import annotations

from iei import settings as table

# Fixed by the deployment, not the operator's to set: where Triton listens and where the frontend
# finds it, and the model repository baked into the Triton image.
FIXED = {
    "IEI_TRITON_HOST", "IEI_TRITON_HTTP_PORT", "IEI_TRITON_GRPC_PORT", "IEI_TRITON_METRICS_PORT",
    "IEI_TRITON_URL", "IEI_MODEL_REPOSITORY",
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
