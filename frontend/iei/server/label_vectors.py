"""The vectors of /classify's hypotheses (a label in its template), kept per worker: a label set
used again does not reach Triton's text model."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

# Hypotheses' vectors a worker keeps: a few hundred label sets of tens of labels; at most a few MB
# (4096 vectors of 1152 float32 for SigLIP so400m: 19 MB).
LABEL_CACHE_ENTRIES = 4096
Key = tuple[str, str, str]  # (served model, template, label)


@dataclass
class LabelVectors:
    """Hypotheses' unit vectors by (model, template, label); least recently used out first."""

    capacity: int = LABEL_CACHE_ENTRIES
    entries: OrderedDict[Key, np.ndarray] = field(default_factory=OrderedDict)

    def get(self, key: Key) -> np.ndarray | None:
        vector = self.entries.get(key)
        if vector is not None:
            self.entries.move_to_end(key)
        return vector

    def put(self, key: Key, vector: np.ndarray) -> None:
        """Keep a copy of `vector`: a row of a batch would keep the whole batch alive."""
        self.entries[key] = vector.copy()
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
