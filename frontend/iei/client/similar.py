"""`iei similar`: the images of an `iei embed` file nearest to a query image."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from .errors import IEIError
from .index_files import BulkError, load_index
from .sync_client import IEIClient

log = logging.getLogger("iei")


def nearest(query: np.ndarray, vectors: np.ndarray, top: int) -> list[tuple[int, float]]:
    """(row, cosine similarity) of the `top` rows nearest to `query`, best first."""
    if vectors.shape[1] != query.shape[0]:
        raise BulkError(
            f"the index holds {vectors.shape[1]}-value vectors, the service makes "
            f"{query.shape[0]}: another model?"
        )
    norms = np.linalg.norm(vectors, axis=1)
    scores = vectors @ (query / np.linalg.norm(query)) / np.where(norms > 0, norms, 1.0)
    best = np.argsort(-scores, kind="stable")[:top]
    return [(int(row), float(scores[row])) for row in best]


def run_similar(args: argparse.Namespace) -> int:
    try:
        paths, vectors = load_index(args.index)
        with IEIClient(args.url, args.api_key) as client:
            query = client.embed([args.query])[0]
        found = nearest(query, vectors, args.top)
    except (BulkError, OSError) as exc:
        log.error("%s", exc)
        return 2
    except IEIError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.writelines(f"{score:.4f}\t{paths[row]}\n" for row, score in found)
    return 0
