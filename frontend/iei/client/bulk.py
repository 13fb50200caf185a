"""`iei embed`: a folder of images into a file of vectors (formats: `index_files.py`).

An image the service refuses (its 422: not an image, too many pixels, …) or a file that cannot be
read is skipped with a warning and counted; a refused batch is retried one image at a time so that
only the bad file is lost, and so is a batch that broke the model (424) or ran out of time (504
without `Retry-After`), unless images keep failing so alone: then the service is at fault, and the
run stops. Skipped files are not recorded and are tried again by `--resume`, which
continues the journal of an interrupted run (or, when the run had finished, starts from the
finished file).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .async_client import AsyncIEIClient
from .core import RetryPolicy, facts_of
from .errors import BackendError, IEIError, ValidationError
from .index_files import (
    NO_VECTOR,
    UNKNOWN,
    BulkError,
    Journal,
    Journaled,
    Made,
    files_of,
    journal_path,
    load_index,
    output_format,
    partial,
    read_journal,
    stack,
    write_index,
)
from .inputs import printable

log = logging.getLogger("iei")

# What a folder walk picks up (files named on the command line are taken whatever their suffix).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif",
     ".tiff"}
)  # fmt: skip


def find_images(roots: Iterable[Path]) -> list[str]:
    """The image paths under `roots`, each once, folders walked recursively in sorted order; a
    folder that cannot be listed is a warning (its images were left out without a word)."""

    def unlisted(error: OSError) -> None:
        log.warning("skipped the folder %s: %s", printable(str(error.filename)),
                    error.strerror or error)  # fmt: skip

    found: dict[str, None] = {}
    for root in roots:
        if root.is_file():
            found[str(root)] = None
        elif root.is_dir():
            for folder, subfolders, files in os.walk(root, onerror=unlisted):
                subfolders.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        found[os.path.join(folder, name)] = None
        else:
            raise BulkError(f"no such file or folder: {root}")
    return list(found)


# --- embedding ---------------------------------------------------------------------------------


# Images that fail alone with a 424 or 504 one after another, no success between: the service
# fails every image (a broken model, a server too slow for any request), not one bad file.
FAILED_ALONE_LIMIT = 3


@dataclass
class Tally:
    embedded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_files(paths: Sequence[str], max_bytes: int | None = None) -> list[bytes | OSError]:
    """Each file's bytes, or why it cannot be read: not a regular file (a FIFO named `x.jpg`
    blocked the run, deaf to Ctrl-C), or over `max_bytes` (the service's payload limit: a file
    that can never be accepted was read whole and sent, twice)."""
    contents: list[bytes | OSError] = []
    for path in paths:
        try:
            # O_NONBLOCK: opening a FIFO waits for a writer otherwise (no effect on files)
            descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(descriptor, "rb") as file:
                status = os.fstat(file.fileno())
                if not stat.S_ISREG(status.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                if max_bytes is not None and status.st_size > max_bytes:
                    raise OSError(
                        errno.EFBIG,
                        f"{status.st_size} bytes, over the service's payload limit of "
                        f"{max_bytes} bytes",
                    )
                contents.append(file.read())
        except OSError as exc:
            contents.append(exc)
    return contents


async def embed_paths(
    client: AsyncIEIClient,
    paths: Sequence[str],
    *,
    batch_size: int,
    concurrency: int,
    normalize: bool,
    on_embedded: Callable[[Sequence[str], np.ndarray], None],
    on_skipped: Callable[[str, str], None],
    max_bytes: int | None = None,
) -> None:
    """Embed `paths` in batches, `concurrency` requests in flight; report each result. A file
    over `max_bytes` (the service's payload limit) is skipped unread."""
    batches: Iterator[Sequence[str]] = (
        paths[i : i + batch_size] for i in range(0, len(paths), batch_size)
    )

    failed_alone = 0  # images that failed alone with a 424 or 504 since the last success

    async def embed_batch(batch: Sequence[str], contents: Sequence[bytes]) -> None:
        nonlocal failed_alone
        try:
            vectors = await client.embed(contents, normalize=normalize)
        except (ValidationError, BackendError) as exc:
            if isinstance(exc, BackendError) and not broken_by_an_image(exc):
                raise
            if len(batch) > 1:
                for path, content in zip(batch, contents, strict=True):  # find the bad one(s)
                    await embed_batch([path], [content])
                return
            if isinstance(exc, BackendError):
                failed_alone += 1
                if failed_alone >= FAILED_ALONE_LIMIT:
                    raise
                on_skipped(batch[0], f"the service failed on it ({exc})")
            else:
                on_skipped(batch[0], strip_index(exc.message))
            return
        failed_alone = 0
        on_embedded(batch, vectors)

    async def worker() -> None:
        for batch in batches:  # one shared iterator: each batch goes to one worker
            contents = await asyncio.to_thread(read_files, batch, max_bytes)
            readable = [
                (p, c) for p, c in zip(batch, contents, strict=True) if isinstance(c, bytes)
            ]
            for path, content in zip(batch, contents, strict=True):
                if isinstance(content, OSError):
                    on_skipped(path, f"cannot read: {content.strerror or content}")
            if readable:
                await embed_batch([p for p, _ in readable], [c for _, c in readable])

    async with asyncio.TaskGroup() as workers:
        for _ in range(concurrency):
            workers.create_task(worker())


def broken_by_an_image(error: BackendError) -> bool:
    """Whether one image of the request may be the cause: a 424 (it broke the model, which still
    answers a probe) or a 504 without `Retry-After` (it took longer than a request may; a 504
    with one is a model still loading, which the client retried)."""
    return error.status == 424 or (error.status == 504 and error.retry_after is None)


def not_done(paths: Sequence[str], done: dict[str, np.ndarray]) -> list[str]:
    """The paths no earlier run embedded (`done` holds their `printable` names), a path compared
    as written and as an absolute path: `--resume` from another spelling of the folder
    (`Pictures`, `./Pictures`, `/home/me/Pictures`) embeds nothing twice. No file system call
    (2 us a path), so a link followed in one spelling and not the other still counts as another
    file."""
    finished = {printable(os.path.abspath(p)) for p in done}
    return [
        p
        for p in paths
        if printable(p) not in done and printable(os.path.abspath(p)) not in finished
    ]


def strip_index(message: str) -> str:
    """`inputs[0]: not an image` -> `not an image` (the index means nothing to the user)."""
    return message.split(": ", 1)[1] if message.startswith("inputs[") else message


def prepare(out: Path, resume: bool, overwrite: bool) -> Journaled:
    """What earlier runs finished (for --resume), and what made it, after checking what is on
    disk."""
    existing = [f for f in files_of(out) if f.exists()]
    if not resume:
        if existing and not overwrite:
            names = ", ".join(str(f) for f in existing)
            raise BulkError(f"{names} exists: continue with --resume, or replace with --overwrite")
        # Only the journal goes now (a `.jsonl` is its own): a finished `.npy` / `.parquet` is
        # replaced when the new one is written, so a run that fails leaves it as it was.
        journal_path(out).unlink(missing_ok=True)
        return Journaled({}, UNKNOWN)
    journal = journal_path(out)
    if journal.exists():
        return read_journal(journal, repair=True, vectors=output_format(out) != ".jsonl")
    if out.exists():  # a finished .npy/.parquet: continue from it (new files in the folders)
        paths, vectors, made = load_index(out, "--out")
        done = dict(zip(paths, vectors, strict=True))
        # Seeded under a temporary name: a seed cut short (Ctrl-C, a full disk) must not pass for
        # the journal, which the next `--resume` would take for all that is done.
        try:
            seed = Journal(partial(journal), made)
            try:
                seed.append(paths, vectors)
            finally:
                seed.close()
            os.replace(partial(journal), journal)
        except BaseException:
            partial(journal).unlink(missing_ok=True)
            raise
        return Journaled(done, made)
    return Journaled({}, UNKNOWN)


def run_embed(args: argparse.Namespace) -> int:
    out = Path(args.out)
    started = time.perf_counter()
    try:
        uris = [p for p in map(str, [*args.paths, args.out]) if "://" in p]
        if uris:
            raise BulkError(f"{uris[0]}: URIs need a Ray Data job (--ray, docs/bulk.md)")
        output_format(out)
        for written in (out, journal_path(out)):
            if written.is_dir():  # found at the end, once every image was embedded, before
                raise BulkError(f"{written} is a folder: --out names the index file to write")
        paths = find_images(map(Path, args.paths))
        if not paths:
            raise BulkError(f"no image files in {', '.join(map(str, args.paths))}")
        done, made_before = prepare(out, args.resume, args.overwrite)
        journal = Journal(journal_path(out))  # what makes the vectors: known once /info is read
    except (BulkError, OSError) as exc:
        log.error("%s", exc)
        return 2
    todo = not_done(paths, done)
    tally = Tally()
    progress = tqdm(
        total=len(todo), unit="img", desc="embedding", disable=args.no_progress, file=sys.stderr
    )

    # A `.jsonl` is written as it goes: its vectors need not stay in memory (3 GB for a million
    # 768-value vectors), only which paths are done; `.npy` / `.parquet` keep them to the end.
    keeps_vectors = output_format(out) != ".jsonl"

    # Files are read by their paths, and recorded (journal, index, `done`) by printable names:
    # a name that is not UTF-8 cannot go into JSON or Parquet as it is.
    def embedded(batch: Sequence[str], vectors: np.ndarray) -> None:
        names = [printable(p) for p in batch]
        journal.append(names, vectors)
        done.update(zip(names, vectors if keeps_vectors else [NO_VECTOR] * len(batch), strict=True))
        tally.embedded += len(batch)
        progress.update(len(batch))

    def skipped(path: str, reason: str) -> None:
        log.warning("skipped %s: %s", printable(path), reason)
        tally.skipped.append((printable(path), reason))
        progress.update(1)

    async def embed_all() -> None:
        retry = RetryPolicy(attempts=max(0, args.retries) + 1)
        async with AsyncIEIClient(
            args.url, args.api_key, batch_size=args.batch_size, retry=retry, model=args.model
        ) as client:
            info = await client.info()
            facts = facts_of(info, args.model)
            dimension = facts.get("embedding_dimension")
            payload = (info.get("limits") or {}).get("payload_limit")
            journal.made = Made.of({"model": facts.get("model_id"), "normalized": not args.raw})
            if done and (clash := made_before.clash(journal.made)):
                raise BulkError(
                    f"{out} holds {clash} (this run's): resume with the same model and options, "
                    "or start again with --overwrite"
                )
            if done and dimension and len(next(iter(done.values()))) != dimension:
                raise BulkError(f"{out} holds vectors of another model (not {dimension} values)")
            if not keeps_vectors:  # checked: a resumed `.jsonl`'s vectors are on disk already
                done.update(dict.fromkeys(done, NO_VECTOR))
            await embed_paths(
                client, todo, batch_size=args.batch_size, concurrency=args.concurrency,
                normalize=not args.raw, on_embedded=embedded, on_skipped=skipped,
                max_bytes=int(payload) if payload else None,
            )  # fmt: skip

    try:
        with logging_redirect_tqdm(), progress:
            asyncio.run(embed_all())
    except (BaseExceptionGroup, BulkError, IEIError, OSError, KeyboardInterrupt) as exc:
        return report_stop(exc, len(done))
    finally:
        journal.close()

    if not done:  # every file skipped: no index of nothing (`iei similar` could not read it)
        journal_path(out).unlink(missing_ok=True)
        log.error("nothing embedded: all %d files were skipped (the warnings say why)", len(paths))
        return 1
    if output_format(out) != ".jsonl":
        order = {printable(path): index for index, path in enumerate(paths)}
        final = sorted(done, key=lambda p: order.get(p, len(order)))  # earlier runs' extras last
        try:
            write_index(
                out, final, stack([done[p] for p in final]), made_before.merged(journal.made)
            )
        except OSError as exc:
            log.error("cannot write %s: %s (the vectors are kept in %s: continue with --resume)",
                      out, exc, journal_path(out))  # fmt: skip
            return 1
        except KeyboardInterrupt:
            log.error("interrupted writing %s (the vectors are kept in %s: continue with --resume)",
                      out, journal_path(out))  # fmt: skip
            return 130
        journal_path(out).unlink()
    seconds = time.perf_counter() - started
    rate = tally.embedded / seconds if seconds > 0 else 0.0
    sys.stdout.write(
        f"embedded {tally.embedded} images, skipped {len(tally.skipped)}, "
        f"{len(paths) - len(todo)} already done, in {seconds:.1f} s ({rate:.1f} images/s) "
        f"-> {printable(str(out))} ({len(done)} vectors)\n"
    )
    return 0


def report_stop(exc: BaseException, kept: int) -> int:
    """One line for a run that stopped early, and its exit status; the journal stays."""
    while isinstance(exc, BaseExceptionGroup):  # from the TaskGroup of workers
        exc = exc.exceptions[0]
    if isinstance(exc, BulkError):
        log.error("%s", exc)
        return 2
    if isinstance(exc, IEIError | OSError):  # OSError: the journal not written (a full disk)
        log.error("stopped: %s (%d vectors kept; continue with --resume)", exc, kept)
        return 1
    if isinstance(exc, KeyboardInterrupt):
        log.error("interrupted (%d vectors kept; continue with --resume)", kept)
        return 130
    raise exc
