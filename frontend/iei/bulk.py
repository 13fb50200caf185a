"""`iei embed` (a folder of images into a file of vectors) and `iei similar` (search that file).

Output formats, chosen by the suffix of `--out`:

- `.jsonl`: one `{"path", "embedding"}` object per line, appended as requests finish (so in
  completion order). The file is its own progress record: `--resume` reads the paths back (a torn
  last line from a killed run is cut off) and embeds only the others.
- `.npy` (+ `NAME.ids.json`, the paths in row order) and `.parquet` (columns `path`, `embedding`):
  written once at the end, rows in the order the paths were walked. Until then results go to a
  sidecar journal `OUT.progress.jsonl` in the `.jsonl` format; `--resume` continues it (or, when
  the run had finished, starts from the finished file) and the journal is removed once the output
  is written. Output files are replaced atomically, so an interrupted run never leaves half a file.

An image the service refuses (its 422: not an image, too many pixels, …) or a file that cannot be
read is skipped with a warning and counted; a refused batch is retried one image at a time so that
only the bad file is lost. Skipped files are not recorded and are tried again by `--resume`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .client import AsyncIEIClient, IEIClient, IEIError, RetryPolicy, ValidationError

log = logging.getLogger("iei")

# What a folder walk picks up (files named on the command line are taken whatever their suffix).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif",
     ".tiff"}
)  # fmt: skip
FORMATS = (".jsonl", ".npy", ".parquet")


class BulkError(Exception):
    """A problem with the command's arguments or files: reported in one line, exit status 2."""


# --- finding images ----------------------------------------------------------------------------


def find_images(roots: Iterable[Path]) -> list[str]:
    """The image paths under `roots`, each once, folders walked recursively in sorted order."""
    found: dict[str, None] = {}
    for root in roots:
        if root.is_file():
            found[str(root)] = None
        elif root.is_dir():
            for folder, subfolders, files in os.walk(root):
                subfolders.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        found[os.path.join(folder, name)] = None
        else:
            raise BulkError(f"no such file or folder: {root}")
    return list(found)


# --- output files ------------------------------------------------------------------------------


def output_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise BulkError(f"--out must end in {', '.join(FORMATS)}, not {out.name!r}")
    return suffix


def ids_path(out: Path) -> Path:
    """`vectors.npy` keeps its paths in `vectors.ids.json`."""
    return out.with_suffix(".ids.json")


def journal_path(out: Path) -> Path:
    return out if output_format(out) == ".jsonl" else out.with_name(out.name + ".progress.jsonl")


def files_of(out: Path) -> list[Path]:
    """Every file a run writes for `out`."""
    files = [out, journal_path(out)]
    if output_format(out) == ".npy":
        files.append(ids_path(out))
    return list(dict.fromkeys(files))


def read_journal(path: Path, repair: bool = False) -> dict[str, np.ndarray]:
    """path -> vector from a `.jsonl` file; with `repair`, a torn last line is cut off the file."""
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        if not repair:
            raise BulkError(f"{path}: the last line is incomplete (an interrupted run?)")
        log.warning("%s: dropping an incomplete last line (an interrupted write)", path)
        with open(path, "r+b") as file:
            file.truncate(complete)
    done: dict[str, np.ndarray] = {}
    for number, line in enumerate(data[:complete].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            done[str(record["path"])] = np.asarray(record["embedding"], dtype=np.float32)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BulkError(f"{path}:{number}: not a {{path, embedding}} line ({exc})") from None
    return done


def load_index(path: Path) -> tuple[list[str], np.ndarray]:
    """(paths, float32 vectors (N, D)) from a file that `iei embed` wrote."""
    if not path.exists():
        raise BulkError(f"no such index: {path}")
    kind = output_format(path)
    if kind == ".jsonl":
        done = read_journal(path)
        return list(done), stack(list(done.values()))
    if kind == ".npy":
        vectors = np.load(path).astype(np.float32, copy=False)
        paths = orjson.loads(ids_path(path).read_bytes())
    else:
        pq = import_parquet()
        table = pq.read_table(path, columns=["path", "embedding"])
        paths = table.column("path").to_pylist()
        vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    if len(paths) != len(vectors):
        raise BulkError(f"{path}: {len(vectors)} vectors but {len(paths)} paths")
    return [str(p) for p in paths], vectors.reshape(len(paths), -1)


def write_index(out: Path, paths: list[str], vectors: np.ndarray) -> None:
    """Write `.npy` + ids or `.parquet`, each file through a temporary name and a rename."""
    kind = output_format(out)
    if kind == ".npy":
        with open(partial(out), "wb") as file:
            np.save(file, vectors)
        partial(ids_path(out)).write_bytes(orjson.dumps(paths, option=orjson.OPT_INDENT_2))
        os.replace(partial(ids_path(out)), ids_path(out))
        os.replace(partial(out), out)
    elif kind == ".parquet":
        pa, pq = import_arrow(), import_parquet()
        dimension = vectors.shape[1]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dimension)
        table = pa.table({"path": pa.array(paths, pa.string()), "embedding": embedding})
        pq.write_table(table, partial(out))
        os.replace(partial(out), out)


def partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def stack(vectors: list[np.ndarray]) -> np.ndarray:
    try:
        return np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    except ValueError:
        raise BulkError("the vectors have different lengths (made by different models?)") from None


def import_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BulkError(".parquet needs pyarrow: pip install 'iei[tools]'") from None
    return pq


def import_arrow() -> Any:
    import pyarrow as pa

    return pa


class Journal:
    """Appends `{"path", "embedding"}` lines, flushed after every batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "ab")  # noqa: SIM115 - closed by close()

    def append(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        for path, vector in zip(paths, vectors, strict=True):
            line = orjson.dumps(
                {"path": path, "embedding": vector}, option=orjson.OPT_SERIALIZE_NUMPY
            )
            self.file.write(line + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# --- embedding ---------------------------------------------------------------------------------


@dataclass
class Tally:
    embedded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_files(paths: Sequence[str]) -> list[bytes | OSError]:
    contents: list[bytes | OSError] = []
    for path in paths:
        try:
            contents.append(Path(path).read_bytes())
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
) -> None:
    """Embed `paths` in batches, `concurrency` requests in flight; report each result."""
    batches: Iterator[Sequence[str]] = (
        paths[i : i + batch_size] for i in range(0, len(paths), batch_size)
    )

    async def embed_batch(batch: Sequence[str], contents: Sequence[bytes]) -> None:
        try:
            vectors = await client.embed(contents, normalize=normalize)
        except ValidationError as exc:
            if len(batch) == 1:
                on_skipped(batch[0], strip_index(exc.message))
                return
            for path, content in zip(batch, contents, strict=True):  # find the bad one(s)
                await embed_batch([path], [content])
            return
        on_embedded(batch, vectors)

    async def worker() -> None:
        for batch in batches:  # one shared iterator: each batch goes to one worker
            contents = await asyncio.to_thread(read_files, batch)
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


def strip_index(message: str) -> str:
    """`inputs[0]: not an image` -> `not an image` (the index means nothing to the user)."""
    return message.split(": ", 1)[1] if message.startswith("inputs[") else message


def prepare(out: Path, resume: bool, overwrite: bool) -> dict[str, np.ndarray]:
    """What earlier runs finished (for --resume), after checking what is on disk."""
    existing = [f for f in files_of(out) if f.exists()]
    if not resume:
        if existing and not overwrite:
            names = ", ".join(str(f) for f in existing)
            raise BulkError(f"{names} exists: continue with --resume, or replace with --overwrite")
        for file in existing:
            file.unlink()
        return {}
    journal = journal_path(out)
    if journal.exists():
        return read_journal(journal, repair=True)
    if out.exists():  # a finished .npy/.parquet: continue from it (new files in the folders)
        paths, vectors = load_index(out)
        done = dict(zip(paths, vectors, strict=True))
        seed = Journal(journal)
        seed.append(paths, vectors)
        seed.close()
        return done
    return {}


def run_embed(args: argparse.Namespace) -> int:
    out: Path = args.out
    started = time.perf_counter()
    try:
        output_format(out)
        paths = find_images(args.paths)
        if not paths:
            raise BulkError(f"no image files in {', '.join(map(str, args.paths))}")
        done = prepare(out, args.resume, args.overwrite)
    except (BulkError, OSError) as exc:
        log.error("%s", exc)
        return 2
    todo = [p for p in paths if p not in done]
    tally = Tally()
    journal = Journal(journal_path(out))
    progress = tqdm(
        total=len(todo), unit="img", desc="embedding", disable=args.no_progress, file=sys.stderr
    )

    def embedded(batch: Sequence[str], vectors: np.ndarray) -> None:
        journal.append(batch, vectors)
        done.update(zip(batch, vectors, strict=True))
        tally.embedded += len(batch)
        progress.update(len(batch))

    def skipped(path: str, reason: str) -> None:
        log.warning("skipped %s: %s", path, reason)
        tally.skipped.append((path, reason))
        progress.update(1)

    async def embed_all() -> None:
        retry = RetryPolicy(attempts=max(0, args.retries) + 1)
        async with AsyncIEIClient(
            args.url, args.api_key, batch_size=args.batch_size, retry=retry
        ) as client:
            dimension = (await client.info()).get("embedding_dimension")
            if done and dimension and len(next(iter(done.values()))) != dimension:
                raise BulkError(f"{out} holds vectors of another model (not {dimension} values)")
            await embed_paths(
                client, todo, batch_size=args.batch_size, concurrency=args.concurrency,
                normalize=not args.raw, on_embedded=embedded, on_skipped=skipped,
            )  # fmt: skip

    try:
        with logging_redirect_tqdm(), progress:
            asyncio.run(embed_all())
    except (BaseExceptionGroup, BulkError, IEIError, KeyboardInterrupt) as exc:
        return report_stop(exc, len(done))
    finally:
        journal.close()

    if output_format(out) != ".jsonl":
        order = {path: index for index, path in enumerate(paths)}
        final = sorted(done, key=lambda p: order.get(p, len(order)))  # earlier runs' extras last
        write_index(out, final, stack([done[p] for p in final]))
        journal_path(out).unlink()
    seconds = time.perf_counter() - started
    rate = tally.embedded / seconds if seconds > 0 else 0.0
    sys.stdout.write(
        f"embedded {tally.embedded} images, skipped {len(tally.skipped)}, "
        f"{len(paths) - len(todo)} already done, in {seconds:.1f} s ({rate:.1f} images/s) "
        f"-> {out} ({len(done)} vectors)\n"
    )
    return 0


def report_stop(exc: BaseException, kept: int) -> int:
    """One line for a run that stopped early, and its exit status; the journal stays."""
    while isinstance(exc, BaseExceptionGroup):  # from the TaskGroup of workers
        exc = exc.exceptions[0]
    if isinstance(exc, BulkError):
        log.error("%s", exc)
        return 2
    if isinstance(exc, IEIError):
        log.error("stopped: %s (%d vectors kept; continue with --resume)", exc, kept)
        return 1
    if isinstance(exc, KeyboardInterrupt):
        log.error("interrupted (%d vectors kept; continue with --resume)", kept)
        return 130
    raise exc


# --- similar -----------------------------------------------------------------------------------


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
