# Triton Inference Server with the `iei` model. NGC 24.10 is Triton 2.51, the version the tests
# run; its Python (3.10) runs model.py in the Python backend and `iei triton`.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# Triton's standard ports inside the container (`iei serve` uses 8100-8102 on a shared host);
# Hugging Face downloads go to HF_HOME, a volume in compose and Kubernetes.
ENV IEI_TRITON_HOST=0.0.0.0 \
    IEI_TRITON_HTTP_PORT=8000 \
    IEI_TRITON_GRPC_PORT=8001 \
    IEI_TRITON_METRICS_PORT=8002 \
    IEI_MODEL_REPOSITORY=/opt/iei/model_repository \
    HF_HOME=/cache/huggingface \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY docker/triton-requirements.txt /tmp/triton-requirements.txt
RUN python3 -m pip install --no-cache-dir -r /tmp/triton-requirements.txt \
    && rm /tmp/triton-requirements.txt

WORKDIR /tmp/iei-src
COPY pyproject.toml README.md ./
COPY frontend ./frontend
# The package maps iei.model_repository to this folder (pyproject.toml): the wheel needs it.
COPY model_repository ./model_repository
# The `iei` command only, its dependencies came above. The package asks for Python 3.11; the
# modules `iei triton` imports also run on 3.10 (tests/test_deploy.py parses them as 3.10).
RUN python3 -m pip install --no-cache-dir --no-deps --ignore-requires-python . \
    && rm -rf /tmp/iei-src \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin iei \
    && mkdir -p /cache/huggingface \
    && chown iei /cache/huggingface

COPY model_repository /opt/iei/model_repository

WORKDIR /opt/iei
USER 10001
EXPOSE 8000 8001 8002
# Renders the repository for the machine (CPU instances without a GPU), then execs tritonserver.
CMD ["iei", "triton"]
