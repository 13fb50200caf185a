"""Compact vectors (Cohere's `embedding_types`), from unit-length float32 vectors, row by row.

- `float`: the unit vector.
- `int8`: the unit vector scaled symmetrically so that its largest component (by magnitude) is
  ±127: `round(v / max|v| * 127)`, in [-127, 127]. A per-vector scale changes no cosine and no
  ranking by cosine; rounding alone costs little (>= 0.99 cosine to the float vector from 64
  dimensions on). A dot product of two int8 vectors is NOT their cosine: normalise them first.
- `uint8`: `int8 + 128`, in [1, 255].
- `ubinary`: one bit per component, `v > 0`, packed 8 to a byte with the first component in
  the highest bit (`numpy.packbits`); a dimension not divisible by 8 is padded with 0 bits.
- `binary`: `ubinary - 128` as a signed byte (sentence-transformers' convention).
- `base64`: the little-endian float32 bytes of the unit vector, base64 (as OpenAI's route).
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np

INT8_MAX = 127


def as_int8(unit: np.ndarray) -> np.ndarray:
    peak = np.abs(unit).max(axis=1, keepdims=True)
    scaled = unit / np.maximum(peak, np.finfo(np.float32).tiny) * INT8_MAX
    return np.rint(scaled).astype(np.int8)


def as_uint8(unit: np.ndarray) -> np.ndarray:
    return (as_int8(unit).astype(np.int16) + 128).astype(np.uint8)


def as_ubinary(unit: np.ndarray) -> np.ndarray:
    return np.packbits(unit > 0, axis=1)


def as_binary(unit: np.ndarray) -> np.ndarray:
    return (as_ubinary(unit).astype(np.int16) - 128).astype(np.int8)


def as_base64(unit: np.ndarray) -> list[str]:
    little_endian = unit.astype("<f4", copy=False)
    return [base64.b64encode(row.tobytes()).decode() for row in little_endian]


def as_float(unit: np.ndarray) -> np.ndarray:
    return unit


ENCODERS: dict[str, Callable[[np.ndarray], np.ndarray | list[str]]] = {
    "float": as_float,
    "int8": as_int8,
    "uint8": as_uint8,
    "binary": as_binary,
    "ubinary": as_ubinary,
    "base64": as_base64,
}


def encode(unit: np.ndarray, kind: str) -> np.ndarray | list[str]:
    """`unit` (N, D) unit-length float32 rows as the embedding type `kind`."""
    return ENCODERS[kind](unit)
