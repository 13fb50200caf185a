"""The served models: `IEI_MODELS` (or the one-model `IMAGE_EMBEDDING_MODEL`) parsed and checked
once, for the launcher (which Triton models to render and load) and the frontend (which one a
request's `model` picks). Imports nothing of the server or the launcher; runs on the Triton image's
Python 3.10.

    IEI_MODELS="clip=openai/clip-vit-base-patch32,dino=facebook/dinov2-small?pooling=cls"

A comma-separated list of `[name=]model[?option=value&...]`: `model` is a hub id or a local folder;
`name` (what clients send as `model`) defaults to the id, or to a folder's own name. The first is
the default model. Options set what the global settings cannot set for every model alike, checked
as the global setting is: `pooling`, `dtype`, `engine` (IEI_POOLING, IEI_DTYPE, IEI_ENGINE),
`instances` (IEI_TRITON_INSTANCES) and `pinned` (`true`: loaded at start and never unloaded by
IEI_MODEL_IDLE_UNLOAD; the default model always is, the others are not unless told).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .contract import MODEL_NAME, STAGE_MODEL_NAMES, TEXT_MODEL_NAME
from .settings import SETTINGS

# Options of one model -> the global setting whose values (and meaning) it takes.
OPTIONS = {"pooling": "pooling", "dtype": "dtype", "engine": "engine"}
INSTANCES_RANGE = (1, 64)  # as IEI_TRITON_INSTANCES (launcher/settings.py)
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True,
            "false": False, "0": False, "no": False, "off": False}  # fmt: skip
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
# The Triton model of the default model keeps the contract's names (`iei`, `iei_text`); another
# model's are `iei__<name>` with everything but letters, digits, `_` and `-` made `_`.
DERIVED_PREFIX = f"{MODEL_NAME}__"


class ModelsError(ValueError):
    """IEI_MODELS (or --model) cannot be served: the one line that says why."""


@dataclass(frozen=True)
class ServedModel:
    name: str  # what a request's `model` says
    model_id: str  # hub id or local folder, as configured
    default: bool = False
    pooling: str | None = None  # None: the global setting (IEI_POOLING)
    dtype: str | None = None
    engine: str | None = None
    instances: int | None = None
    pinned: bool = True  # loaded at start, never unloaded
    aliases: tuple[str, ...] = field(default=(), compare=False)  # other names it answers to

    @property
    def triton_base(self) -> str:
        """The name of its image model in Triton: `iei` for the default."""
        if self.default:
            return MODEL_NAME
        return DERIVED_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "_", self.name)

    def triton_name(self, template: str) -> str:
        """Its Triton model for a model folder of the repository (`iei`, `iei_text`,
        `iei_preprocess`, `iei_encoder`)."""
        if self.default:
            return template
        return self.triton_base + template.removeprefix(MODEL_NAME)

    @property
    def triton_image(self) -> str:
        return self.triton_name(MODEL_NAME)

    @property
    def triton_text(self) -> str:
        return self.triton_name(TEXT_MODEL_NAME)

    def triton_names(self) -> tuple[str, ...]:
        """Every Triton name it may use (both layouts, texts or not)."""
        return tuple(self.triton_name(t) for t in (MODEL_NAME, TEXT_MODEL_NAME, *STAGE_MODEL_NAMES))

    def options(self) -> dict[str, object]:
        """Its own settings, as given (None: the global one)."""
        return {
            "pooling": self.pooling, "dtype": self.dtype, "engine": self.engine,
            "instances": self.instances, "pinned": self.pinned,
        }  # fmt: skip


def default_name(model_id: str) -> str:
    """A model's name when none is given: a folder's own name for a path (`/`, `.` or `~` first),
    else the id as written. Decided from the text alone, so that the frontend and Triton's
    container (where the folder may not exist) name it alike."""
    if model_id.startswith((".", "/", "~")):
        # The path's last part as written: `resolve()` followed a link (`./models/current`)
        # where this container has one, and not where Triton's does, so their names differed.
        name = os.path.basename(os.path.normpath(os.path.expanduser(model_id)))
        if name in ("", ".", ".."):  # `.`, `..`, `/`: only the folder itself can name it
            name = Path(model_id).expanduser().resolve().name
        return name or model_id
    return model_id


def parse_item(item: str, position: int) -> ServedModel:
    """One `[name=]model[?option=value&...]` of IEI_MODELS."""
    where = f"IEI_MODELS item {position + 1} ({item!r})"
    spec, _, query = item.partition("?")
    name, sep, model_id = spec.partition("=")
    if not sep:
        name, model_id = "", spec
    name, model_id = name.strip(), model_id.strip()
    if not model_id:
        raise ModelsError(f"{where}: no model (expected [name=]model[?option=value&...])")
    name = name or default_name(model_id)
    if not NAME.fullmatch(name):
        raise ModelsError(
            f"{where}: name {name!r} must start with a letter or digit and hold at most 128 "
            "letters, digits and . _ : / @ + -"
        )
    options: dict[str, object] = {}
    for pair in filter(None, (p.strip() for p in query.split("&"))):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if key in options:
            raise ModelsError(f"{where}: option {key!r} given twice")
        if key in OPTIONS:
            allowed = SETTINGS[OPTIONS[key]].type.split("|")
            if value not in allowed:
                env = SETTINGS[OPTIONS[key]].env
                raise ModelsError(
                    f"{where}: {key}={value!r}: expected one of {', '.join(allowed)} (as {env})"
                )
            options[key] = value
        elif key == "instances":
            low, high = INSTANCES_RANGE
            if not value.isdigit() or not low <= int(value) <= high:
                raise ModelsError(f"{where}: instances={value!r}: expected {low} to {high}")
            options[key] = int(value)
        elif key == "pinned":
            if value.lower() not in BOOLEANS:
                raise ModelsError(
                    f"{where}: pinned={value!r}: expected true or false (or 1/0, yes/no, "
                    "on/off, as the boolean settings)"
                )
            options[key] = BOOLEANS[value.lower()]
        else:
            known = ", ".join([*OPTIONS, "instances", "pinned"])
            raise ModelsError(f"{where}: unknown option {key!r} (options: {known})")
        if not sep or not value:
            raise ModelsError(f"{where}: option {key!r} has no value")
    default = position == 0
    if default and options.get("pinned") is False:
        raise ModelsError(f"{where}: the default (first) model is always pinned")
    options.setdefault("pinned", default)  # the others unload when idle (IEI_MODEL_IDLE_UNLOAD)
    return ServedModel(name=name, model_id=model_id, default=default, **options)  # type: ignore[arg-type]


def parse_models(value: str) -> tuple[ServedModel, ...]:
    """IEI_MODELS, checked: at least one model, names unique, Triton names unique."""
    items = [item.strip() for item in value.split(",")]
    if not any(items):
        raise ModelsError("IEI_MODELS names no model")
    if not all(items):
        raise ModelsError(f"IEI_MODELS has an empty item: {value!r}")
    models = tuple(parse_item(item, i) for i, item in enumerate(items))
    seen: dict[str, str] = {}
    for model in models:
        if model.name in seen:
            raise ModelsError(f"IEI_MODELS: the name {model.name!r} is given twice")
        seen[model.name] = model.name
    triton: dict[str, str] = {}
    for model in models:
        for name in model.triton_names():
            if name in triton:
                raise ModelsError(
                    f"IEI_MODELS: {model.name!r} and {triton[name]!r} would share the Triton "
                    f"model {name!r}: rename one"
                )
            triton[name] = model.name
    return with_aliases(models)


def with_aliases(models: tuple[ServedModel, ...]) -> tuple[ServedModel, ...]:
    """Each model also answers to its id and its id's last part, where no other model's name or
    alias is the same."""
    names = {m.name for m in models}
    candidates = {m.name: [m.model_id, m.model_id.rstrip("/").rsplit("/", 1)[-1]] for m in models}
    counts: dict[str, int] = {}
    for aliases in candidates.values():
        for alias in set(aliases):
            counts[alias] = counts.get(alias, 0) + 1
    result = []
    for model in models:
        own = tuple(
            dict.fromkeys(
                a for a in candidates[model.name]
                if a != model.name and a not in names and counts[a] == 1
            )
        )  # fmt: skip
        result.append(replace(model, aliases=own))
    return tuple(result)


def single_model(model_id: str, served_name: str | None) -> tuple[ServedModel, ...]:
    """The one-model form (IMAGE_EMBEDDING_MODEL): named IEI_SERVED_MODEL_NAME, else its id;
    also answers to its id and its id's last part, as IEI always did."""
    name = served_name or model_id
    aliases = tuple(
        a for a in dict.fromkeys((model_id, model_id.rstrip("/").rsplit("/", 1)[-1])) if a != name
    )
    return (ServedModel(name=name, model_id=model_id, default=True, aliases=aliases),)


def lookup(models: tuple[ServedModel, ...], requested: str | None) -> ServedModel | None:
    """The model a request's `model` names (None or empty: the default); None if none is."""
    if not requested:
        return models[0]
    for model in models:
        if requested == model.name:
            return model
    for model in models:
        if requested in model.aliases:
            return model
    return None
