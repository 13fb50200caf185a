"""The content cache: raw vectors by model and content, so a repeated input never reaches Triton.

Exact match only: the key is the model (its served name and the pooling, dtype and engine it
reports, so a model served twice with other options never shares entries) and a SHA-256 of the
input's content (an image's file bytes, as uploaded, decoded from base64 or fetched from its URL;
a text's UTF-8), with its modality. Values are the RAW vectors as Triton returned them: every
response option (`normalize`, `dimensions`, `output_dimension`, the compact types) is applied
after the cache, so one entry serves every route and option.

Bounded in bytes (IEI_CACHE_MB), least recently used out first; one per worker process, shared by
its requests (an event loop: no lock needed).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

# What an entry costs besides its vector's bytes: the array's header, the key (a tuple and a
# 32-byte digest) and the dict's slot; counted so that IEI_CACHE_MB bounds resident memory.
ENTRY_OVERHEAD = 320

ModelKey = tuple[str, str, str, str, str]  # served name, checkpoint, pooling, dtype, engine
Key = tuple[ModelKey, str, bytes]  # the model, the modality, SHA-256 of the content


def digest(content: str | bytes) -> bytes:
    """SHA-256 of an image file's bytes or a text's UTF-8 (hashlib releases the GIL on large
    buffers, so a thread can hash while the event loop runs)."""
    data = content.encode() if isinstance(content, str) else content
    return hashlib.sha256(data).digest()


class VectorCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # bytes counted, entries' overhead included
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> np.ndarray | None:
        vector = self._entries.get(key)
        if vector is not None:
            self._entries.move_to_end(key)  # most recently used
        return vector

    def put(self, key: Key, vector: np.ndarray) -> None:
        """Keep a copy of `vector` (never a view that would hold a whole batch alive), then drop
        the least recently used entries until the cache fits its bytes again."""
        cost = vector.nbytes + ENTRY_OVERHEAD
        if not self.enabled or cost > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old.nbytes + ENTRY_OVERHEAD
        self._entries[key] = np.array(vector, dtype=np.float32, copy=True)
        self.size += cost
        while self.size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.size -= dropped.nbytes + ENTRY_OVERHEAD
