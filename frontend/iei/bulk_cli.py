"""Arguments of `iei embed` and `iei similar`, kept apart from their work in `bulk.py`.

`iei triton` runs on the Triton image's Python 3.10 and imports `cli.py`: this module holds only
argparse, and `bulk` (asyncio.TaskGroup, the client, tqdm) is imported when a tool runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def run(args: argparse.Namespace) -> int:
    from . import bulk

    return bulk.run_embed(args) if args.command == "embed" else bulk.run_similar(args)


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the IEI service (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("IEI_API_KEY"),
        help="Bearer key of the service (default: $IEI_API_KEY)",
    )


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="image files and folders"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="result file: .jsonl, .npy (+ .ids.json) or .parquet",
    )
    add_service_arguments(parser)
    parser.add_argument(
        "--concurrency", type=positive, default=4, help="requests in flight (default 4)"
    )
    parser.add_argument(
        "--batch-size", type=positive, default=16,
        help="images per request (default 16, at most the server's max_client_batch_size)",
    )  # fmt: skip
    parser.add_argument(
        "--retries", type=int, default=4,
        help="retries of a request answered 429/503 or not answered, with back-off (default 4)",
    )  # fmt: skip
    parser.add_argument(
        "--raw", action="store_true", help="keep raw vectors (default: unit length)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run, skipping finished files"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_similar_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", metavar="QUERY_IMAGE", help="an image file (or http(s) URL)")
    parser.add_argument("--index", required=True, type=Path, help="a file written by `iei embed`")
    parser.add_argument("--top", type=positive, default=10, help="how many to show (default 10)")
    add_service_arguments(parser)
