"""The files `iei embed` writes and `iei similar` reads, chosen by the suffix of `--out`:

- `.jsonl`: one `{"path", "embedding", "model", "normalized"}` object per line, appended as
  requests finish (so in completion order). The file is its own progress record: `--resume` reads
  the paths back (a torn last line from a killed run is cut off) and embeds only the others.
- `.npy` (+ `NAME.ids.json`, the paths in row order) and `.parquet` (columns `path`, `embedding`;
  the model and `normalized` in its metadata, `iei.model` and `iei.normalized`):
  written once at the end, rows in the order the paths were walked. Until then results go to a
  sidecar journal `OUT.progress.jsonl` in the `.jsonl` format. Output files are replaced
  atomically, so an interrupted run never leaves half a file (and a `.npy` never pairs with
  another write's ids: `_write_index`).

What made the vectors (`Made`: the model's id, whether they are normalized) is recorded so that
`--resume` never adds another model's vectors to an index (of the same length, they would pass
for its own) and `iei similar` / `iei search` never rank an index by another model's query. A
`.npy`, and a file of an earlier version, records nothing and is taken on trust.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

log = logging.getLogger("iei")

FORMATS = (".jsonl", ".npy", ".parquet")


class BulkError(Exception):
    """A problem with the command's arguments or files: reported in one line, exit status 2."""


# --- output files ------------------------------------------------------------------------------


def output_format(out: Path, option: str = "--out") -> str:
    """`out`'s format, refused before any work when this install cannot write it (`option`
    names the argument in the refusal)."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise BulkError(f"{option} must end in {', '.join(FORMATS)}, not {out.name!r}")
    if suffix == ".parquet":
        import_parquet()
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


NO_VECTOR = np.empty(0, dtype=np.float32)  # a `.jsonl` run's done paths: the vector is on disk


class Made(NamedTuple):
    """What made an index's vectors: the served model's id and whether they are normalized to
    unit length (`--raw`: not). None where nothing was recorded."""

    model: str | None = None
    normalized: bool | None = None

    @classmethod
    def of(cls, record: dict[str, Any]) -> Made:
        model, normalized = record.get("model"), record.get("normalized")
        return cls(
            model if isinstance(model, str) else None,
            normalized if isinstance(normalized, bool) else None,
        )

    def stamp(self) -> dict[str, Any]:
        """The fields a `.jsonl` line carries (none that is not known)."""
        return {key: value for key, value in self._asdict().items() if value is not None}

    def clash(self, other: Made) -> str | None:
        """How vectors made as `other` differ from these where both are known (None: they may
        share an index)."""
        if self.model and other.model and self.model != other.model:
            return f"vectors of {self.model}, not of {other.model}"
        if None not in (self.normalized, other.normalized) and self.normalized != other.normalized:
            return f"{'normalized' if self.normalized else 'raw (--raw)'} vectors, not " + (
                "normalized ones" if other.normalized else "raw ones (--raw)"
            )
        return None

    def merged(self, other: Made) -> Made:
        """The known fields of both (they do not clash)."""
        normalized = self.normalized if self.normalized is not None else other.normalized
        return Made(self.model or other.model, normalized)


UNKNOWN = Made()  # nothing recorded: a `.npy`, or a file of an earlier version


class Journaled(NamedTuple):
    done: dict[str, np.ndarray]  # path -> vector
    made: Made


def read_journal(path: Path, repair: bool = False, vectors: bool = True) -> Journaled:
    """path -> vector from a `.jsonl` file, read a line at a time, and what made them; with
    `repair`, a torn last line is cut off the file. Without `vectors` only the first is kept, the
    others empty (a `.jsonl` run needs which paths are done and the vectors' size, not the
    vectors: a journal of 10,000 read whole took 220 MiB). Lines of two models, or of normalized
    and raw vectors, are a BulkError: no query can rank them together."""
    done: dict[str, np.ndarray] = {}
    made, seen = UNKNOWN, set()
    complete, torn = 0, False  # bytes of whole lines, and whether a line follows them
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.endswith(b"\n"):
                torn = True
                break
            complete += len(line)
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                vector = np.asarray(record["embedding"], dtype=np.float32)
                done[str(record["path"])] = vector if vectors or not done else NO_VECTOR
                line_made = Made.of(record)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                why = f"{path}:{number}: not a {{path, embedding}} line ({exc})"
                raise BulkError(why) from None
            if line_made not in seen:  # a few distinct values in a file: checked once each
                seen.add(line_made)
                if clash := line_made.clash(made):
                    raise BulkError(f"{path}:{number}: {clash} as on the lines before it")
                made = made.merged(line_made)
    if torn:
        if not repair:
            raise BulkError(f"{path}: the last line is incomplete (an interrupted run?)")
        log.warning("%s: dropping an incomplete last line (an interrupted write)", path)
        with open(path, "r+b") as file:
            file.truncate(complete)
    return Journaled(done, made)


class Index(NamedTuple):
    paths: list[str]
    vectors: np.ndarray  # float32 (N, D)
    made: Made


def load_index(path: Path, option: str = "--index") -> Index:
    """(paths, float32 vectors (N, D), what made them) from a file that `iei embed` wrote;
    anything else under its name (a text file, a truncated `ids.json`, a foreign Parquet) is a
    one-line BulkError."""
    kind = output_format(path, option)
    if not path.exists():
        raise BulkError(f"no such index: {path}")
    if kind == ".jsonl":
        done, made = read_journal(path)
        return Index(list(done), stack(list(done.values())), made)
    try:  # numpy's, orjson's and pyarrow's refusals are ValueErrors, or Arrow's Type/KeyErrors
        paths, vectors, made = read_index(path, kind)
    except (ValueError, TypeError, KeyError, IndexError, EOFError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BulkError(f"{path}: not an index written by iei embed ({reason})") from None
    if len(paths) != len(vectors):
        raise BulkError(f"{path}: {len(vectors)} vectors but {len(paths)} paths")
    if not paths:
        raise BulkError(f"{path} holds no vectors")
    return Index(paths, vectors.reshape(len(paths), -1), made)


# A Parquet index's metadata: what made its vectors (the values JSON).
PARQUET_MADE = {"model": b"iei.model", "normalized": b"iei.normalized"}


def read_index(path: Path, kind: str) -> Index:
    """A `.npy` (+ ids) or `.parquet` index as it is on disk, checked only for its types."""
    made = UNKNOWN
    if kind == ".npy":
        if not ids_path(path).exists():
            raise BulkError(
                f"{path}: its paths, {ids_path(path).name}, are missing (a write cut short? "
                "`iei embed --resume` writes the index again)"
            )
        vectors = np.load(path).astype(np.float32, copy=False)
        paths = orjson.loads(ids_path(path).read_bytes())
        if not isinstance(paths, list):
            raise TypeError(f"{ids_path(path).name} holds a {type(paths).__name__}, not a list")
    else:
        pq = import_parquet()
        import pyarrow as pa  # there once pyarrow.parquet is

        table = pq.read_table(path, columns=["path", "embedding"])
        metadata = table.schema.metadata or {}
        made = Made.of(
            {k: orjson.loads(metadata[v]) for k, v in PARQUET_MADE.items() if v in metadata}
        )
        paths = table.column("path").to_pylist()
        column = table.column("embedding").combine_chunks()
        if pa.types.is_fixed_size_list(column.type):  # what `iei embed` writes: no Python floats
            values = column.flatten().to_numpy(zero_copy_only=False)  # a null row has none
            vectors = values.astype(np.float32, copy=False).reshape(-1, column.type.list_size)
        else:  # lists of any length, from another writer
            vectors = np.asarray(column.to_pylist(), dtype=np.float32)
    if vectors.ndim == 0:
        raise ValueError("a single number, not an array of vectors")
    return Index([str(p) for p in paths], vectors, made)


def write_index(out: Path, paths: list[str], vectors: np.ndarray, made: Made = UNKNOWN) -> None:
    """Write `.npy` + ids or `.parquet` (with what made the vectors), each file through a
    temporary name and a rename; a failed or interrupted write (a full disk, Ctrl-C) leaves no
    temporary file behind."""
    try:
        _write_index(out, paths, vectors, made)
    except BaseException:
        for file in files_of(out):
            partial(file).unlink(missing_ok=True)
        raise


def _write_index(out: Path, paths: list[str], vectors: np.ndarray, made: Made) -> None:
    kind = output_format(out)
    if kind == ".npy":
        with open(partial(out), "wb") as file:
            np.save(file, vectors)
        partial(ids_path(out)).write_bytes(orjson.dumps(paths, option=orjson.OPT_INDENT_2))
        # Two files cannot be replaced at once, and new vectors with old paths (or the other way
        # round) would read as an index when the row counts match: the old paths go first and
        # the new ones come last, so a write cut short in between leaves an index without its
        # paths, which `load_index` refuses and `--resume` (its journal still there) writes again.
        ids_path(out).unlink(missing_ok=True)
        os.replace(partial(out), out)
        os.replace(partial(ids_path(out)), ids_path(out))
    elif kind == ".parquet":
        pq = import_parquet()
        import pyarrow as pa  # there once pyarrow.parquet is

        dimension = vectors.shape[1]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dimension)
        table = pa.table({"path": pa.array(paths, pa.string()), "embedding": embedding})
        metadata = {PARQUET_MADE[k]: orjson.dumps(v) for k, v in made.stamp().items()}
        pq.write_table(table.replace_schema_metadata(metadata), partial(out))
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


class Journal:
    """Appends `{"path", "embedding"}` lines, and what made the vectors where it is known
    (`made`), flushed after every batch."""

    def __init__(self, path: Path, made: Made = UNKNOWN) -> None:
        self.path = path
        self.made = made
        self.file = open(path, "ab")  # noqa: SIM115 - closed by close()
        self.failed = False  # an append raised (a full disk): its bytes may still be buffered

    def append(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        stamp = self.made.stamp()
        try:
            for path, vector in zip(paths, vectors, strict=True):
                line = orjson.dumps(
                    {"path": path, "embedding": vector, **stamp},
                    option=orjson.OPT_SERIALIZE_NUMPY,
                )
                self.file.write(line + b"\n")
            self.file.flush()
        except OSError:
            self.failed = True
            raise

    def close(self) -> None:
        """Close; after a failed append the buffered rest is dropped, not raised again (the
        error was reported once; `--resume` cuts a torn last line off)."""
        try:
            self.file.close()
        except OSError:
            if not self.failed:
                raise
