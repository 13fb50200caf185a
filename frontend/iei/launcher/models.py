"""Which Triton models serve the model: `iei` always, `iei_text` as well for a dual encoder, and
in which layout (`iei` alone, or the ensemble of `iei_preprocess` and `iei_encoder`).

The rule is the model repository's own (`iei_runtime/families.py`, read by its path: the
repository never imports this package, and the launcher follows the repository it serves),
applied to the model's config.json: a local folder's, or the hub's through huggingface_hub (its
cache, HF_HUB_OFFLINE and HF_TOKEN as usual). Runs on the Triton image's Python 3.10.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from ..contract import MODEL_NAME, STAGE_MODEL_NAMES, TEXT_MODEL_NAME

log = logging.getLogger("iei")

RULES = Path("iei_runtime") / "families.py"


def read_model_config(model_id: str) -> dict[str, Any] | None:
    """The model's config.json, or None (with a warning) when it cannot be read here: the model
    then loads in Triton alone, and its own error says what is wrong."""
    try:
        local = Path(model_id).expanduser()
        if local.is_dir():
            path = local / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model_id, "config.json"))
        config = json.loads(path.read_text())
    except Exception as exc:  # a missing file, no network, a private repository, bad JSON...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("cannot read the config.json of %s (%s): serving images only", model_id, reason)
        return None
    return config if isinstance(config, dict) else None


def repository_rules(repository: Path) -> ModuleType | None:
    """The repository's `families.py` (it imports nothing), or None in a repository without it."""
    return repository_module(repository / RULES)


def repository_module(path: Path) -> ModuleType | None:
    """A module of the repository's `iei_runtime/` that imports only the standard library, loaded
    by its path; None where the repository has no such file."""
    spec = importlib.util.spec_from_file_location(f"iei_repository_{path.stem}", path)
    if not path.is_file() or spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def served_models(model_id: str, repository: Path, pooling: str = "auto") -> tuple[str, ...]:
    """The Triton models to load: `iei`, and `iei_text` when the repository has it and the model
    has a text tower whose vectors share the image space (CLIP, SigLIP, SigLIP2) as the image
    vectors pooled by IEI_POOLING do (`mean` on CLIP leaves that space: no texts)."""
    if not (repository / TEXT_MODEL_NAME / "config.pbtxt").is_file():
        return (MODEL_NAME,)
    rules = repository_rules(repository)
    config = read_model_config(model_id) if rules is not None else None
    if rules is None or config is None:
        return (MODEL_NAME,)
    # A repository from before IEI_POOLING counted has only the dual-encoder rule.
    serves_texts = getattr(rules, "serves_texts", lambda config, _: rules.has_text_tower(config))
    return (MODEL_NAME, TEXT_MODEL_NAME) if serves_texts(config, pooling) else (MODEL_NAME,)


def model_layout(requested: str, gpus: int, model_id: str, repository: Path) -> str:
    """IEI_TRITON_LAYOUT resolved. `auto`: split on a GPU host, where the device must not wait
    for one process's decoding; single on a CPU-only host, where both layouts share the same cores
    and one process measured faster (docs/benchmarks.md); single too for a model whose image
    input is more than pixel_values (SigLIP2 NaFlex), which the split layout cannot carry."""
    if requested != "auto":
        return requested
    if gpus == 0:
        return "single"
    rules = repository_rules(repository)
    config = read_model_config(model_id) if rules is not None else None
    if rules is not None and config is not None and not rules.pixels_only(config):
        return "single"
    return "split"


def layout_models(models: tuple[str, ...], layout: str) -> tuple[str, ...]:
    """The models Triton loads: the served ones, and the ensemble's steps in the split layout."""
    return (*models, *STAGE_MODEL_NAMES) if layout == "split" else models
