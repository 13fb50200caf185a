"""A stand-in for Triton's `triton_python_backend_utils`, so model.py runs without Triton."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
MODEL_PY = REPOSITORY / "iei" / "1" / "model.py"
TEXT_MODEL_PY = REPOSITORY / "iei_text" / "1" / "model.py"


class TritonError:
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self._message = message
        self.code = code
        self.responded = False  # given to a response (see InferenceResponse)

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(
        self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None
    ) -> None:
        # One error object backs one response: with one TritonError shared by several
        # responses, Triton 2.51's Python backend sent garbage as their messages and then
        # segfaulted (the sticky fault model did so, in CI and in 1 of 2 runs under load here).
        if error is not None:
            if error.responded:
                raise AssertionError("one TritonError given to two responses")
            error.responded = True
        self.output_tensors = output_tensors or []
        self.error = error

    def has_error(self) -> bool:
        return self.error is not None


class InferenceRequest:
    def __init__(self, tensors: list[Tensor], outputs: tuple[str, ...] = ("EMBEDDING",)) -> None:
        self.tensors = {t.name(): t for t in tensors}
        self.outputs = list(outputs)

    def requested_output_names(self) -> list[str]:
        return self.outputs


class Logger:
    messages: ClassVar[list[str]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.messages.append(message)

    log_warn = log_error = log_verbose = log_info


class Metric:
    def __init__(self, family: MetricFamily, labels: dict[str, str]) -> None:
        self.family = family
        self.labels = labels
        self._value = 0.0

    def increment(self, value: float) -> None:
        if self.family.kind == MetricFamily.COUNTER and value < 0:
            raise ValueError("a counter only goes up")
        self._value += value

    def set(self, value: float) -> None:
        if self.family.kind == MetricFamily.COUNTER:
            raise ValueError("a counter cannot be set")
        self._value = value

    def value(self) -> float:
        return self._value


class MetricFamily:
    """Triton's custom metrics (python_backend since 23.05): a family by name, one Metric per set
    of labels (one family per model instance: in Triton each is a process of its own).
    `families` keeps every one made, for tests to read through `total`."""

    COUNTER = "COUNTER"
    GAUGE = "GAUGE"
    HISTOGRAM = "HISTOGRAM"
    families: ClassVar[list[MetricFamily]] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise ValueError(f"unknown metric kind {kind!r}")
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[Metric] = []
        MetricFamily.families.append(self)

    def Metric(self, labels: dict[str, str] | None = None) -> Metric:  # Triton's name
        metric = Metric(self, dict(labels or {}))
        self.metrics.append(metric)
        return metric

    @classmethod
    def total(cls, name: str, **labels: str) -> float:
        """The sum over every family `name`'s metrics whose labels include `labels`; raises
        KeyError when none was made."""
        families = [f for f in cls.families if f.name == name]
        if not families:
            raise KeyError(name)
        metrics = [m for f in families for m in f.metrics]
        return sum(m.value() for m in metrics if labels.items() <= m.labels.items())


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return request.tensors.get(name)


def install() -> None:
    """This module as Triton's `triton_python_backend_utils`, and the model repository's shared
    code (`iei_runtime`) importable, as inside Triton."""
    fake = types.ModuleType("triton_python_backend_utils")
    for name in ("TritonError", "Tensor", "InferenceResponse", "Logger", "MetricFamily",
                 "get_input_tensor_by_name"):  # fmt: skip
        setattr(fake, name, globals()[name])
    sys.modules["triton_python_backend_utils"] = fake
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))


def load_model_module(path: Path = MODEL_PY) -> Any:
    """Import a model's model.py (`iei`'s unless `path` says otherwise) with this module
    standing in for Triton's."""
    install()
    spec = importlib.util.spec_from_file_location(f"triton_model_{path.parts[-3]}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module
