"""The `iei` command: arguments here, the work in the part that does it.

`iei serve` and `iei triton` need the `serve` extra (the launcher); `iei embed`, `iei similar`,
`iei search` and `iei tag` need only the base package (the client). Each part is imported when
its command runs, so a client install never imports the server's dependencies, and `iei triton`
runs on the Triton image's Python 3.10.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("iei")

DEFAULT_URL = "http://127.0.0.1:8000"


def add_service_arguments(
    parser: argparse.ArgumentParser,
    model_help: str = "which served model embeds (GET /v1/models lists them; default: the "
    "server's)",
) -> None:
    parser.add_argument(
        "--url",
        type=service_url,
        default=DEFAULT_URL,
        help=f"the IEI service (default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        type=api_key,
        default=os.environ.get("IEI_API_KEY"),
        help="Bearer key of the service (default: $IEI_API_KEY)",
    )
    parser.add_argument("--model", default=None, help=model_help)


def service_url(value: str) -> str:
    """An http(s) URL: `127.0.0.1:8000` (how IEI_TRITON_URL is written) failed only once sent."""
    if not value.lower().startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{value!r} is no http:// or https:// URL")
    return value


def api_key(value: str) -> str | None:
    """The key without the white space around it (a file's trailing newline, as the server
    strips its own): httpx refused the header, and the call read as an unreachable server."""
    return value.strip() or None


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    # Strings, not Paths: with --ray they may be URIs (Path would fold s3:// into s3:/).
    parser.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="image files and folders; with --ray also URIs (s3://bucket/prefix, file:///...)",
    )  # fmt: skip
    parser.add_argument(
        "--out",
        required=True,
        help="result file: .jsonl, .npy (+ .ids.json) or .parquet; with --ray a folder (or URI) "
        "of Parquet files",
    )
    add_service_arguments(
        parser,
        "which served model embeds (GET /v1/models lists them; default: the server's); with "
        "--ray and without --url: the model (hub id or folder) run in Ray's actors",
    )
    parser.set_defaults(url=None)  # DEFAULT_URL unless --ray --model (main sets it)
    parser.add_argument(
        "--concurrency", type=positive, default=4, help="requests in flight (default 4)"
    )
    parser.add_argument(
        "--batch-size", type=positive, default=16,
        help="images per request (default 16, at most the server's max_client_batch_size)",
    )  # fmt: skip
    parser.add_argument(
        "--retries", type=int,
        help="retries of a request answered 429/503 or not answered, with back-off (default 4; "
        "8 with --ray, about 90 s: a job outlives a server's restart)",
    )  # fmt: skip
    parser.add_argument(
        "--raw", action="store_true", help="keep raw vectors (default: unit length)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run, skipping finished files"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group(
        "bulk jobs on Ray Data (the `ray` extra; docs/bulk.md)",
        "--out is then a folder of Parquet files (path, embedding, sha256, error), written as the "
        "job goes; the model runs in Ray's actors (--model MODEL) or they call a service (--url "
        "URL, and --model picks one of its models).",
    )
    ray.add_argument(
        "--ray", nargs="?", const="local", metavar="local|auto|ADDRESS",
        help="run as a Ray Data job: `local` (the default) starts Ray on this machine's cores, "
        "`auto` joins the cluster this machine belongs to, ADDRESS joins that one",
    )  # fmt: skip
    ray.add_argument(
        "--actors", type=positive,
        help="with --ray: actors (default: one per GPU, else one per node with its cores; "
        "with --url one per node, --concurrency requests in flight among them)",
    )  # fmt: skip
    ray.add_argument(
        "--actor-cpus", type=positive,
        help="with --ray --model on CPUs: cores (torch threads) per actor (default: the node's "
        "cores shared by its actors)",
    )  # fmt: skip
    ray.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16", "int8"),
        help="with --ray --model: IEI_DTYPE in the actors (default: $IEI_DTYPE, else auto)",
    )  # fmt: skip


def add_query_arguments(parser: argparse.ArgumentParser, metavar: str, what: str) -> None:
    parser.add_argument("query", metavar=metavar, help=what)
    parser.add_argument("--index", required=True, type=Path, help="a file written by `iei embed`")
    parser.add_argument("--top", type=positive, default=10, help="how many to show (default 10)")
    add_service_arguments(parser)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", action="append", metavar="[NAME=]MODEL[?OPTIONS]", dest="models",
        help="a model to serve (repeatable; the first is the default): the same items as "
        "IEI_MODELS; replaces IEI_MODELS and IMAGE_EMBEDDING_MODEL",
    )  # fmt: skip


def launch(command: str, models: list[str] | None = None) -> int:
    """`iei serve` or `iei triton`, with the settings read and checked first."""
    if models is not None:  # read as IEI_MODELS, by this process and the ones it starts
        if not all(item.strip() for item in models):  # `--model "$M"` with M unset
            log.error("--model needs a model: one of them is empty")
            return 2
        os.environ["IEI_MODELS"] = ",".join(models)
        # --model replaces the environment's models, IMAGE_EMBEDDING_MODEL's too
        if os.environ.pop("IMAGE_EMBEDDING_MODEL", None):
            log.info("--model given: IMAGE_EMBEDDING_MODEL is not used")
    try:
        from . import settings as table
        from .launcher.settings import LauncherSettings
    except ImportError as exc:
        log.error(
            "`iei %s` needs the serve extra (%s is not installed): pip install 'iei[serve]'",
            command, exc.name,
        )  # fmt: skip
        return 2
    from .launcher.serve import serve, serve_triton

    settings = table.load(LauncherSettings)
    return serve(settings) if command == "serve" else serve_triton(settings)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iei", description="Image Embedding Inference")
    parser.add_argument("--version", action="version", version=f"iei {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_model_argument(commands.add_parser(
        "serve",
        help="run Triton and the HTTP frontend in the foreground",
        description="Run Triton Inference Server and the HTTP frontend; settings come from "
        "the environment (IMAGE_EMBEDDING_MODEL or IEI_MODELS, IEI_*), see the README.",
    ))  # fmt: skip
    triton = commands.add_parser(
        "triton",
        help="run Triton alone in the foreground, supervised (the container command)",
        description="Render the model repository for this machine (CPU instances without a "
        "GPU) and run tritonserver with the launch arguments of `iei serve`, restarting it when "
        "it, its model's stub or its model's answers fail, as `iei serve` does.",
    )
    add_model_argument(triton)
    add_embed_arguments(
        commands.add_parser(
            "embed",
            help="embed image files and folders through a running service into a file",
            description="Embed every image under PATH... through a running IEI service and "
            "write the vectors to --out (.jsonl, .npy + .ids.json, or .parquet).",
        )
    )
    add_query_arguments(
        commands.add_parser(
            "similar",
            help="the images of an `iei embed` file nearest to a query image",
            description="Embed QUERY_IMAGE through the service and print the --top paths of "
            "--index with the highest cosine similarity.",
        ),
        "QUERY_IMAGE",
        "an image file (or http(s) URL)",
    )
    add_query_arguments(
        commands.add_parser(
            "search",
            help="the images of an `iei embed` file that best match a text",
            description="Embed TEXT through the service (a model with a text tower: CLIP, "
            "SigLIP, SigLIP2) and print the --top paths of --index with the highest cosine "
            "similarity.",
        ),
        "TEXT",
        'what to look for, e.g. "a cat on a sofa"',
    )
    tag = commands.add_parser(
        "tag",
        help="label image files with zero-shot classification through a running service",
        description="Score every image under PATH... against --labels (POST /classify: a model "
        "with a text tower, CLIP, SigLIP or SigLIP2) and print each file's labels and scores, "
        "highest first, or write them as JSON lines to --out. A broken file is reported and "
        "skipped.",
    )
    tag.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and folders")
    tag.add_argument(
        "--labels", required=True, help='the candidate labels, comma-separated: "cat,dog,car"'
    )
    tag.add_argument(
        "--template", default="This is a photo of {}.",
        help="the text each label is put into, at {} (default: %(default)r)",
    )  # fmt: skip
    tag.add_argument(
        "--top", type=positive, default=None, help="keep each file's K best labels (default: all)"
    )
    tag.add_argument("--out", type=Path, default=None, help="a .jsonl file (default: stdout)")
    add_service_arguments(
        tag, "which served model classifies (GET /v1/models lists them; default: the server's)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s iei: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    if args.command in ("serve", "triton"):
        return launch(args.command, args.models)
    # The client's dependencies only, imported when a tool runs.
    try:
        if args.command == "embed":
            return embed(args)
        if args.command == "tag":
            from .client.tag import run_tag

            return run_tag(args)
        from .client.similar import run_search, run_similar

        return run_similar(args) if args.command == "similar" else run_search(args)
    except KeyboardInterrupt:  # Ctrl-C anywhere: one line (`iei embed` names its journal itself)
        log.error("interrupted")
        return 130


def embed(args: argparse.Namespace) -> int:
    """`iei embed`: a Ray Data job, or the client's loop against a running service."""
    if args.ray is not None:
        try:
            from .ray.job import run_ray_embed
        except ImportError as exc:
            log.error("--ray needs the ray extra (%s is not installed): "
                      "pip install 'iei[ray]'", exc.name)  # fmt: skip
            return 2
        return run_ray_embed(args)
    from .client.bulk import run_embed

    args.url = args.url or DEFAULT_URL
    args.retries = 4 if args.retries is None else args.retries
    return run_embed(args)


if __name__ == "__main__":
    sys.exit(main())
