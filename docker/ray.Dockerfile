# The image of a Ray cluster that runs `iei embed --ray` (KubeRay's RayJob:
# deploy/kubernetes/ray/rayjob-embed.yaml). Ray's own image, at the Ray version the `ray` extra
# pins (every node of a cluster runs the same Ray), with IEI, Ray Data and the model's runtime
# (torch, transformers: the `serve` extra) for --model. The -gpu tag runs on CPU nodes too.
FROM rayproject/ray:2.60.0-py311-gpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/ray/cache/huggingface

WORKDIR /tmp/iei-src
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users frontend ./frontend
COPY --chown=ray:users model_repository ./model_repository
# A wheel install: the model repository goes inside the package (iei/model_repository). The
# extras pin what matters (ray, torch, pyarrow, numpy) in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[ray,serve]" \
    && rm -rf /tmp/iei-src

WORKDIR /home/ray
# `ray` (uid 1000) in Ray's images.
USER 1000
