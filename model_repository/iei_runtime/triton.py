"""What the Triton models share about Triton itself: their instances, and responses with
per-request errors. The one module here that imports Triton's `triton_python_backend_utils`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .images import InvalidImage

INPUT_NAME = "IMAGE"
OUTPUT_NAME = "EMBEDDING"
INFO_OUTPUT_NAME = "MODEL_INFO"


def instance_count(model_config: dict[str, Any]) -> int:
    """Instances of this model on this machine (the CPU threads are shared between them)."""
    groups = model_config.get("instance_group") or [{"count": 1}]
    return max(1, sum(int(g.get("count", 1)) for g in groups))


def make_response(results: Sequence[np.ndarray | InvalidImage], info: str | None = None) -> Any:
    """One request's results -> its response: vectors, or an error naming the first bad image.

    The message format `IMAGE[i]: reason` (i = position inside this request) is parsed by the
    frontend to name the failing input of a client's request.
    """
    for i, result in enumerate(results):
        if isinstance(result, InvalidImage):
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(
                    f"{INPUT_NAME}[{i}]: {result}", pb_utils.TritonError.INVALID_ARG
                )
            )
    vectors = np.stack(results).astype(np.float32, copy=False)  # type: ignore[arg-type]
    tensors = [pb_utils.Tensor(OUTPUT_NAME, vectors)]
    if info is not None:
        rows = np.full((len(results), 1), info.encode(), dtype=np.object_)
        tensors.append(pb_utils.Tensor(INFO_OUTPUT_NAME, rows))
    return pb_utils.InferenceResponse(output_tensors=tensors)
