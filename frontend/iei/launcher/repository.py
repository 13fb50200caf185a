"""The model repository Triton loads: where IEI's copy is, and its rendering for this machine."""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ..contract import MODEL_NAME, QUEUE_PRIORITY_LEVELS, STAGE_MODEL_NAMES
from ..models import ServedModel
from .errors import TritonStartupError
from .models import layout_models, repository_module

# A config parameter of the model repository (iei_runtime/settings.py PARAMETERS_FIRST): the
# rendered parameters of one of several models come before the Triton process's environment.
PARAMETERS_FIRST = "parameters_first"


@dataclass(frozen=True)
class ModelPlan:
    """One served model in Triton: its layout, its served repository models (`iei`, and
    `iei_text` for a dual encoder) and its settings as config parameters."""

    model: ServedModel
    layout: str = "single"
    served: tuple[str, ...] = (MODEL_NAME,)
    parameters: Mapping[str, str] = field(default_factory=dict)

    @property
    def templates(self) -> tuple[str, ...]:
        """Its folders of the repository: the served ones, and the ensemble's steps (split)."""
        return layout_models(self.served, self.layout)

    @property
    def triton_models(self) -> tuple[str, ...]:
        """Its Triton models in the order they load: an ensemble's steps before it."""
        steps = [t for t in self.templates if t in STAGE_MODEL_NAMES]
        rest = [t for t in self.templates if t not in STAGE_MODEL_NAMES]
        return tuple(self.model.triton_name(t) for t in (*steps, *rest))


# IEI_FORWARD_BATCH_SIZE=auto on a CPU (iei_runtime/settings.py FORWARD_BATCH_AUTO; a test
# checks that they agree).
CPU_FORWARD_BATCH = 8

# The package's folder, frontend/iei in a checkout, site-packages/iei in a wheel install.
_PACKAGE = Path(__file__).resolve().parents[1]


def shipped_model_repository() -> Path:
    """The repository IEI ships: inside the package in a wheel (pyproject.toml maps it there),
    the checkout's `model_repository/` in an editable install or a checkout."""
    packaged = _PACKAGE / "model_repository"
    return packaged if packaged.is_dir() else _PACKAGE.parents[1] / "model_repository"


def gpu_count() -> int:
    """GPUs this process may use, without importing CUDA libraries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "void"):
        return 0
    devices = len(glob.glob("/dev/nvidia[0-9]*"))
    if visible:
        return min(devices, len(visible.split(",")))
    return devices


def render_model_repository(
    source: Path,
    target: Path,
    *,
    gpus: int,
    instances: int | None,
    layout: str = "single",
    preprocess_instances: int | None = None,
    request_timeout: float | None = None,
    max_queue_size: int | None = None,
    forward_batch_size: int | None = None,
    models: Sequence[ModelPlan] | None = None,
) -> Path:
    """Copy the model repository, with every model's config rendered for this machine.

    - Models: each of `models` (none: the repository's own `iei` alone, in `layout`) gets its
      own Triton models in its own layout: the default keeps the repository's names (`iei`,
      `iei_text`), another gets copies named from its served name (`iei__<name>`,
      `iei__<name>_text`, ...), and each one's settings as config parameters, which the model
      reads before the environment (PARAMETERS_FIRST).

    - Layout: `single` serves `iei` as committed (one Python model does everything); `split`
      makes `iei` the ensemble of `iei/configs/split.pbtxt` over `iei_preprocess` (CPU
      instances, `preprocess_instances` of them: see default_preprocess_instances) and
      `iei_encoder` (the device). The other layout's models are left out of the copy.

    - Instances: the committed configs are GPU deployments; without a GPU Triton would refuse
      them, so the copy runs its instances on the CPU. `instances` sets their count.
    - Batches: on a CPU the model runs an execution in forward passes of `forward_batch_size`
      (IEI_FORWARD_BATCH_SIZE, `auto`: 8 there), so the batcher prefers executions of its
      multiples: 10 queued images become an execution of 8 (and 2 wait for the next one), not
      passes of 8 and 2, whose second runs at a fraction of the rate.
    - Queue: two priority levels (probes of the model's health go first, `contract.py`), and a
      queue policy: at most `max_queue_size` requests wait, and a request that waited longer
      than `request_timeout` seconds (the frontend has answered 504 by then) is dropped, not
      computed.
    """
    if not (source / MODEL_NAME / "config.pbtxt").is_file():
        raise TritonStartupError(f"no {MODEL_NAME}/config.pbtxt in model repository {source}")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    plans = list(models or ())
    render_layout(target, plans[0].layout if plans else layout)
    owners: dict[str, ModelPlan] = {}  # Triton model -> the served model it belongs to
    preprocessors = {STAGE_MODEL_NAMES[0]}
    for served in plans:
        if not served.model.default:
            copy_model(source, target, served)
        owners.update({name: served for name in served.triton_models})
        preprocessors.add(served.model.triton_name(STAGE_MODEL_NAMES[0]))
    for config_path in sorted(target.glob("*/config.pbtxt")):
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        plan = owners.get(config.name)
        if plan is not None:
            render_parameters(config, plan.parameters)
        own_instances = (plan.model.instances if plan else None) or instances
        if config.name in preprocessors:  # iei_preprocess: CPU processes on any host
            cores = preprocess_instances or default_preprocess_instances(source, gpus)
            render_instances(config, gpus=0, instances=cores)
        elif config.platform != "ensemble":  # an ensemble has no instances of its own
            render_instances(config, gpus=gpus, instances=own_instances)
        if config.HasField("dynamic_batching"):
            render_queue(config.dynamic_batching, request_timeout, max_queue_size)
            passes = forward_batch_size or (CPU_FORWARD_BATCH if gpus == 0 else 0)
            if config.name not in preprocessors and 0 < passes < config.max_batch_size:
                preferred = range(passes, config.max_batch_size + 1, passes)
                config.dynamic_batching.preferred_batch_size[:] = preferred
        config_path.write_text(text_format.MessageToString(config))
    return target


# Preprocessing processes per GPU at most, by default: each holds torch and the processor (a few
# hundred MB), and at about 1 ms per 500x375 JPEG per core, 16 decode ~10,000 images/s, what one
# H100 encodes with ViT-B/16 in fp16 (docs/gpu.md).
PREPROCESS_PER_GPU = 16
# iei_encoder's instances per GPU in the shipped config (a test checks that they agree).
ENCODERS_PER_GPU = 2


def default_preprocess_instances(repository: Path, gpus: int) -> int:
    """IEI_PREPROCESS_INSTANCES unset: a process per core, less the encoders' (ENCODERS_PER_GPU
    per GPU), at most PREPROCESS_PER_GPU per GPU. The frontend's workers and Triton share the
    same cores: each stage is busy only part of the time (the GPU decodes plain JPEGs)."""
    cores = available_cores(repository) - ENCODERS_PER_GPU * gpus
    return max(1, min(cores, PREPROCESS_PER_GPU * max(1, gpus)))


# /dev/shm for the split layout (docs/gpu.md, "Shared memory"): the Python backend gives every
# stub (each iei_preprocess and iei_encoder instance) a region in /dev/shm holding the tensors of
# its current execution; a region grows to its largest execution and never shrinks. A "large
# photo" is a 12 MP phone JPEG of at most LARGE_PHOTO_BYTES; it crosses between the steps as the
# file (the GPU decodes it) or as the processor's uint8 (3, H, W) output.
LARGE_PHOTO_BYTES = 4 * 2**20
EXECUTION_IMAGES = 64  # max_batch_size of iei_preprocess and iei_encoder


def split_layout_shm_bytes(
    *,
    gpus: int,
    preprocess_instances: int,
    images_in_flight: int,
    encoders_per_gpu: int = ENCODERS_PER_GPU,
    pixels_side: int = 224,
    photo_bytes: int = LARGE_PHOTO_BYTES,
) -> int:
    """Bytes of shared memory that the split layout's stubs hold at once when every image is a
    large photo.

    - A preprocessing stub executing 64 photos holds them as its input, then as its output (the
      JPEG files passed on; or the pixels of files PIL decodes: less): 2 x 64 x photo_bytes.
    - An encoder stub (`encoders_per_gpu`: IEI_TRITON_INSTANCES, else ENCODERS_PER_GPU) holds 64
      files and 64 x 3 x side x side uint8 pixels.
    - Only executing requests are in shared memory (queued ones wait in Triton's own memory), and
      no more photos execute than the frontends let in flight (IEI_WORKERS x
      IEI_MAX_CONCURRENT_IMAGES): the preprocessing stubs busy at once are the fewer of the two.
    """
    pixels = EXECUTION_IMAGES * 3 * pixels_side * pixels_side
    busy = min(preprocess_instances, max(1, images_in_flight // EXECUTION_IMAGES))
    preprocess = busy * 2 * EXECUTION_IMAGES * photo_bytes
    encoders = encoders_per_gpu * max(1, gpus) * (EXECUTION_IMAGES * photo_bytes + pixels)
    return preprocess + encoders


# Images per execution where a repository's `iei` config does not say (the shipped one's).
MAX_BATCH_SIZE = 64


def max_batch_size(repository: Path) -> int:
    """The `iei` model's max_batch_size in this repository: the most images of one execution,
    so the most one forward pass may hold (IEI_FORWARD_BATCH_SIZE)."""
    try:
        text = (repository / MODEL_NAME / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except Exception:  # no such file, or not a config: render_model_repository says why
        return MAX_BATCH_SIZE
    return config.max_batch_size or MAX_BATCH_SIZE


def available_cores(repository: Path) -> int:
    """The cores this process may use, counted as the model's instances count them."""
    resources = repository_module(repository / "iei_runtime" / "resources.py")
    return resources.available_cores() if resources else (os.cpu_count() or 1)


def render_layout(repository: Path, layout: str) -> None:
    """Keep the models of `layout` in a copied repository (see render_model_repository)."""
    split = repository / MODEL_NAME / "configs" / "split.pbtxt"
    if layout == "split":
        if not split.is_file() or not all((repository / m).is_dir() for m in STAGE_MODEL_NAMES):
            raise TritonStartupError(
                f"IEI_TRITON_LAYOUT=split: model repository {repository} has no split layout "
                f"({MODEL_NAME}/configs/split.pbtxt, {', '.join(STAGE_MODEL_NAMES)})"
            )
        (repository / MODEL_NAME / "config.pbtxt").write_text(split.read_text())
        (repository / MODEL_NAME / "1" / "model.py").unlink()  # an ensemble runs no code
    else:
        for name in STAGE_MODEL_NAMES:
            shutil.rmtree(repository / name, ignore_errors=True)
    shutil.rmtree(split.parent, ignore_errors=True)


def copy_model(source: Path, target: Path, plan: ModelPlan) -> None:
    """The repository folders of a model other than the default, under its own Triton names;
    in the split layout its ensemble's steps are its own copies too."""
    for template in plan.templates:
        folder = target / plan.model.triton_name(template)
        shutil.copytree(
            source / template, folder, ignore=shutil.ignore_patterns("__pycache__", "configs")
        )
        config_path = folder / "config.pbtxt"
        if template == MODEL_NAME and plan.layout == "split":
            config_path.write_text((source / MODEL_NAME / "configs" / "split.pbtxt").read_text())
            (folder / "1" / "model.py").unlink()
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        config.name = folder.name
        for step in config.ensemble_scheduling.step:
            step.model_name = plan.model.triton_name(step.model_name)
        config_path.write_text(text_format.MessageToString(config))


def render_parameters(config: model_config_pb2.ModelConfig, parameters: Mapping[str, str]) -> None:
    """A served model's settings into a config of it, ahead of the environment."""
    if not parameters or config.platform == "ensemble":
        return
    for name, value in {**parameters, PARAMETERS_FIRST: "true"}.items():
        config.parameters[name].string_value = value


def render_instances(
    config: model_config_pb2.ModelConfig, *, gpus: int, instances: int | None
) -> None:
    if gpus == 0:
        del config.instance_group[:]
        config.instance_group.add(
            count=instances or 1, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU
        )
    elif instances:
        for group in config.instance_group:
            group.count = instances


def render_queue(
    batching: model_config_pb2.ModelDynamicBatching,
    request_timeout: float | None,
    max_queue_size: int | None,
) -> None:
    batching.priority_levels = QUEUE_PRIORITY_LEVELS
    batching.default_priority_level = QUEUE_PRIORITY_LEVELS
    policy = batching.default_queue_policy
    if request_timeout is not None:
        policy.timeout_action = model_config_pb2.ModelQueuePolicy.REJECT
        policy.default_timeout_microseconds = int(request_timeout * 1_000_000)
        policy.allow_timeout_override = True
    if max_queue_size is not None:
        policy.max_queue_size = max_queue_size
