"""`iei tag PATH... --labels a,b,c`: each image's zero-shot labels and scores (POST /classify),
a line per file on stdout, or a JSON line per file in `--out`.

A file that cannot be read, or that the service refuses as an image (its 422 naming the input),
is reported and skipped; a refused batch is retried one file at a time so that only the bad file
is lost. Any other refusal (the labels, a model without a text tower) stops the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from .bulk import FAILED_ALONE_LIMIT, broken_by_an_image, find_images, read_files, strip_index
from .core import LabelScores
from .errors import BackendError, IEIError, ValidationError
from .index_files import BulkError, partial
from .inputs import printable
from .sync_client import IEIClient

log = logging.getLogger("iei")

BATCH = 16  # files per call (the client splits further to the server's limits)


def parse_labels(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"]; the service refuses empty and repeated ones."""
    return [label.strip() for label in text.split(",")]


def tag_paths(
    classify: Callable[[Sequence[bytes]], list[LabelScores]],
    paths: Sequence[str],
    on_tagged: Callable[[str, LabelScores], None],
    on_skipped: Callable[[str, str], None],
) -> None:
    """Classify `paths` in batches; report each file's labels, or why it was skipped."""

    failed_alone = 0  # images that failed alone with a 424 or 504 since the last success

    def run(batch: Sequence[str], contents: Sequence[bytes]) -> None:
        nonlocal failed_alone
        try:
            answers = classify(contents)
        except (ValidationError, BackendError) as exc:
            # A 422 naming an input, or a 413 (a file over the payload limit), is a file's; so
            # may be a 424 or a 504 (bulk.py: broken_by_an_image); any other refusal (the
            # labels, the model) is every file's.
            if isinstance(exc, BackendError):
                if not broken_by_an_image(exc):
                    raise
            elif not (exc.message.startswith("inputs[") or exc.status == 413):
                raise
            if len(batch) > 1:
                for path, content in zip(batch, contents, strict=True):  # find the bad one(s)
                    run([path], [content])
                return
            if isinstance(exc, BackendError):
                failed_alone += 1
                if failed_alone >= FAILED_ALONE_LIMIT:  # every image fails: the service's fault
                    raise
                on_skipped(batch[0], f"the service failed on it ({exc})")
            else:
                on_skipped(batch[0], strip_index(exc.message))
            return
        failed_alone = 0
        for path, answer in zip(batch, answers, strict=True):
            on_tagged(path, answer)

    for start in range(0, len(paths), BATCH):
        batch = paths[start : start + BATCH]
        readable = []
        for path, content in zip(batch, read_files(batch), strict=True):
            if isinstance(content, OSError):
                on_skipped(path, f"cannot read: {content.strerror or content}")
            else:
                readable.append((path, content))
        if readable:
            run([p for p, _ in readable], [c for _, c in readable])


def run_tag(args: argparse.Namespace) -> int:
    for option, text in (("--labels", args.labels), ("--template", args.template)):
        if text is not None and printable(text) != text:  # bytes of another encoding in argv
            log.error("%s is not UTF-8 text: %s", option, printable(text))
            return 2
    labels = parse_labels(args.labels)
    out: TextIO = sys.stdout
    skipped = 0

    def tagged(path: str, answer: LabelScores) -> None:
        top = answer[: args.top] if args.top else answer
        if args.out is not None:
            line: dict[str, Any] = {"path": printable(path), "labels": top}
            out.write(orjson.dumps(line).decode() + "\n")
        else:
            scores = "\t".join(f"{d['label']}={d['score']:.4f}" for d in top)
            out.write(f"{printable(path)}\t{scores}\n")

    def skip(path: str, reason: str) -> None:
        nonlocal skipped
        skipped += 1
        log.warning("skipped %s: %s", printable(path), reason)

    # `--out` is written under a temporary name and replaces the file only once every file is
    # tagged: a run that fails (the service down, Ctrl-C) leaves an earlier file as it was.
    written = partial(Path(args.out)) if args.out is not None else None
    try:
        paths = find_images(args.paths)
        if not paths:  # as `iei embed`: an empty run replaced an earlier --out with nothing
            raise BulkError(f"no image files in {', '.join(map(str, args.paths))}")
        if written is not None:
            out = written.open("w", encoding="utf-8")  # closed below
        try:
            with IEIClient(args.url, args.api_key, model=args.model) as client:
                tag_paths(
                    lambda contents: client.classify(contents, labels, template=args.template),
                    paths, tagged, skip,
                )  # fmt: skip
        finally:
            if out is not sys.stdout:
                out.close()
        if written is not None:
            os.replace(written, args.out)
    except (BulkError, OSError) as exc:
        log.error("%s", exc)
        return 2
    except IEIError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if written is not None:
            written.unlink(missing_ok=True)  # what a failed run wrote (gone once replaced)
    log.info("tagged %d files, skipped %d", len(paths) - skipped, skipped)
    return 0 if skipped < len(paths) else 1  # every file skipped: nothing was tagged
