# The HTTP frontend: FastAPI + uvicorn workers, no torch. Talks to Triton at IEI_TRITON_URL.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/iei-metrics

WORKDIR /tmp/iei-src
COPY docker/frontend-constraints.txt pyproject.toml README.md ./
COPY frontend ./frontend
# The package maps iei.model_repository to this folder (pyproject.toml): the wheel needs it.
COPY model_repository ./model_repository
# The client and the `server` extra (not `serve`): the frontend never imports torch.
RUN pip install --no-cache-dir -c frontend-constraints.txt ".[server]" \
    && rm -rf /tmp/iei-src \
    && useradd --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin iei

WORKDIR /
USER 10001
EXPOSE 8000
# Workers are processes: their Prometheus metrics meet in PROMETHEUS_MULTIPROC_DIR, created
# fresh at each start (on /tmp, so the root filesystem can stay read-only). The settings are
# checked first (iei.server.preflight): an invalid one stops the container in one line, where
# uvicorn would restart the workers that exit on it, forever. The flags are those
# that `iei serve` gives uvicorn (frontend/iei/launcher/frontend.py, uvicorn_arguments), and
# IEI_WORKERS=auto (or unset), read as iei serve reads it, is its count for a host without a GPU,
# as this container is.
CMD ["sh", "-c", "rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && workers=$(printf %s \"${IEI_WORKERS:-auto}\" | tr -d '[:space:]' | tr '[:upper:]' '[:lower:]') && case \"$workers\" in auto|'') workers=2 ;; esac && python -m iei.server.preflight && exec uvicorn iei.server.app:create_app --factory --host 0.0.0.0 --port 8000 --workers \"$workers\" --timeout-graceful-shutdown 30 --no-access-log"]
