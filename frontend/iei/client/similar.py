"""`iei similar` and `iei search`: the images of an `iei embed` file nearest to a query image,
or to a text."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import numpy as np

from .core import facts_of
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
    """`iei similar QUERY_IMAGE`: the images nearest to an image."""
    return rank(args, lambda client: client.embed([args.query])[0])


def run_search(args: argparse.Namespace) -> int:
    """`iei search "TEXT"`: the images nearest to a text (a dual encoder: CLIP, SigLIP,
    SigLIP2 put texts and images in one space)."""
    return rank(args, lambda client: client.embed_texts([args.query])[0])


def rank(args: argparse.Namespace, embed_query: Callable[[IEIClient], np.ndarray]) -> int:
    """Print the `--top` rows of `--index` nearest to the query, best first."""
    try:
        paths, vectors, made = load_index(args.index)
        with IEIClient(args.url, args.api_key, model=args.model) as client:
            if made.model:  # the query must come from the model that made the index
                serving = facts_of(client.info(), args.model).get("model_id")
                if isinstance(serving, str) and serving != made.model:
                    raise BulkError(
                        f"{args.index} holds vectors of {made.model}; the service embeds with "
                        f"{serving}: name that model with --model, or embed the images again"
                    )
            query = embed_query(client)
        found = nearest(query, vectors, args.top)
    except (BulkError, OSError) as exc:
        log.error("%s", exc)
        return 2
    except IEIError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.writelines(f"{score:.4f}\t{paths[row]}\n" for row, score in found)
    return 0
