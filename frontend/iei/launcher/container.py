"""`iei triton`: the container command of docker compose and Kubernetes. It renders the model
repository for this machine, then becomes `tritonserver` with the launch arguments of
`iei serve` (exec keeps Triton the process that receives SIGTERM)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from .errors import TritonStartupError
from .models import served_models
from .repository import gpu_count, render_model_repository
from .settings import LauncherSettings
from .triton_process import model_environment, triton_command

log = logging.getLogger("iei")


def run_triton(settings: LauncherSettings) -> int:
    try:
        repository = render_model_repository(
            settings.repository,
            Path(tempfile.mkdtemp(prefix="iei-triton-")) / "model_repository",
            gpus=gpu_count(),
            instances=settings.triton_instances,
        )
        env = {**os.environ, **model_environment(settings)}
    except TritonStartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    models = served_models(settings.embedding_model, settings.repository)
    command = triton_command(settings, repository, models)
    log.info("exec %s", " ".join(command))
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 (becomes tritonserver)
    except OSError as exc:  # only returns on failure
        log.error("cannot start %s: %s (iei triton runs in the Triton image)", command[0], exc)
    return 127
