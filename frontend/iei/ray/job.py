"""`iei embed PATH... --out DIR --ray [local|auto|ADDRESS]`: the same command as a Ray Data job.

    list (tasks, one per folder) -> read + SHA-256 (tasks) -> embed (actors) -> write_parquet

The driver lists each root one level deep; the folders below are walked by Ray's tasks, so a
catalogue spread over folders or prefixes is listed in parallel, and the files are read in
parallel by other tasks. The vectors go to a folder of Parquet files (`path`, `embedding`,
`sha256`, `error`) written while the job runs; a file that cannot be read or decoded gets a row
with its `error` and no `embedding`, and the job goes on. `--resume` keeps the rows written
(a file cut short by a killed run is dropped), drops the rows with an error, and embeds the
files that have no vector yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

from ..client.index_files import BulkError
from . import embed_dataset
from .files import list_roots, locate, read_files, walk_folder

log = logging.getLogger("iei")

LIST_TASKS = 8  # folders listed at once
READ_TASKS = 8  # batches of files read at once
BLOCK_BYTES = 1 << 20  # ~20 camera JPEGs, ~10k paths
ROWS_PER_FILE = 10_000
# Parquet files of at least this many rows (the last one of a block less): a killed job loses
# at most that many unwritten vectors, so fewer on a CPU (2.7 ViT-B/16 images/s on 2 cores: a
# file in 6 minutes) than on GPUs (thousands a second).
ROWS_PER_FILE_CPU = 1_000
ERRORS_SHOWN = 20
# Beside the Parquet files: the job's model and normalisation (`job_identity`). Its `_` keeps it
# out of what Parquet readers take for the table (pyarrow, Spark and DuckDB's globs skip it).
JOB_FILE = "_iei_job.json"
# The hub's token variables (gated models), forwarded to a cluster's actors with the settings.
HUB_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
RAY_RETRIES = 8  # back-off 0.5 s doubling, at most 30 s: about 90 s in all
ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Timeout)\w*: ")


# --- the output folder -------------------------------------------------------------------------


def output_location(out: str) -> tuple[Any, str]:
    """The output folder's pyarrow filesystem and path there."""
    location = locate(out)
    return location.filesystem or fs.LocalFileSystem(), location.path


def parquet_files(filesystem: Any, folder: str, suffix: str = ".parquet") -> list[str]:
    """The folder's files whose name ends in `suffix` (the results; `.parquet.partial`: the
    temporary files of a rewrite that a killed run left). The folder's own, not its
    subfolders': the job writes none there, and another table's files may live in one."""
    selector = fs.FileSelector(folder, recursive=False, allow_not_found=True)
    return sorted(
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == fs.FileType.File and info.path.endswith(suffix)
    )


@dataclass
class Written:
    """What an output folder holds: embedded paths, and the rows with an error."""

    embedded: set[str] = field(default_factory=set)
    errors: list[tuple[str, str]] = field(default_factory=list)
    vectors: int = 0


def read_written(filesystem: Any, folder: str, *, repair: bool, paths: bool) -> Written:
    """The folder's rows. With `repair` (a resume): a file that is not Parquet (cut short by a
    killed run) is deleted, as are a killed rewrite's temporary files, and rows with an error
    are dropped (their files are tried again). A file that could not be read (the store's
    error: throttled, no permission) stops the resume and nothing is deleted. Without `paths`,
    only counts and the errors (from each file's statistics where it can)."""
    written = Written()
    if repair:
        for name in parquet_files(filesystem, folder, ".parquet.partial"):
            log.warning("%s: a rewrite cut short by a killed run, removed", name)
            filesystem.delete_file(name)
    for name in parquet_files(filesystem, folder):
        try:
            with filesystem.open_input_file(name) as file:
                meta = pq.ParquetFile(file).metadata
                if not {"path", "error"} <= set(meta.schema.names):
                    raise BulkError(
                        f"{name}: no `path` and `error` columns (not written by `iei embed "
                        "--ray`): --out names a folder of its results only"
                    )
                clean = null_count(meta, "error") == meta.num_rows  # no row with an error
                table = None
                if paths or not clean:
                    file.seek(0)
                    table = pq.read_table(file, columns=["path", "error"])
        except pa.ArrowInvalid as exc:  # read, and not Parquet: a file a killed run cut short
            if not repair:
                raise BulkError(f"{name}: not a Parquet file ({exc})") from None
            log.warning("%s: unreadable (cut short by a killed run?), removed: %s", name, exc)
            filesystem.delete_file(name)
            continue
        except (OSError, pa.ArrowException) as exc:  # not read at all: the store's error
            raise BulkError(f"cannot read {name}: {exc} (nothing was removed)") from None
        if table is None:
            written.vectors += meta.num_rows
            continue
        rows = table.to_pylist()
        failed = [(r["path"], r["error"]) for r in rows if r["error"] is not None]
        written.vectors += len(rows) - len(failed)
        if paths:
            written.embedded.update(r["path"] for r in rows if r["error"] is None)
        if failed and repair:
            drop_error_rows(filesystem, name)
        else:
            written.errors += failed
    return written


def null_count(meta: Any, column: str) -> int:
    """Nulls of `column` over the file, from its statistics; -1 where they are missing."""
    index = meta.schema.names.index(column)
    total = 0
    for group in range(meta.num_row_groups):
        statistics = meta.row_group(group).column(index).statistics
        if statistics is None or not statistics.has_null_count:
            return -1
        total += statistics.null_count
    return total


def drop_error_rows(filesystem: Any, name: str) -> None:
    """Rewrite a file without its rows that have an error (through a temporary name)."""
    with filesystem.open_input_file(name) as file:
        table = pq.read_table(file)
    kept = table.filter(table.column("error").is_null())
    if kept.num_rows:
        partial = name + ".partial"
        with filesystem.open_output_stream(partial) as out:
            pq.write_table(kept, out)
        filesystem.move(partial, name)
    else:
        filesystem.delete_file(name)


def prepare_output(
    out: str, resume: bool, overwrite: bool, job: dict[str, Any] | None = None
) -> set[str]:
    """Check --out (a folder); for --overwrite, delete its results (its Parquet files, never
    anything else); for --resume, what is embedded, once the vectors there are known to be of
    the same `job` (JOB_FILE: its model and normalisation)."""
    filesystem, folder = output_location(out)
    info = filesystem.get_file_info(folder)
    if info.type == fs.FileType.File:
        raise BulkError(f"{out} is a file: with --ray, --out is a folder of Parquet files")
    if info.type != fs.FileType.Directory:
        return set()
    results = parquet_files(filesystem, folder)
    if not results:
        return set()
    if resume:
        check_same_job(filesystem, folder, out, job)
        return read_written(filesystem, folder, repair=True, paths=True).embedded
    if not overwrite:
        raise BulkError(f"{out} holds results: continue with --resume, or replace with --overwrite")
    for name in results:  # another writer's Parquet files are refused, as by --resume
        with filesystem.open_input_file(name) as file:
            if not {"path", "error"} <= set(pq.ParquetFile(file).schema_arrow.names):
                raise BulkError(
                    f"{name}: no `path` and `error` columns (not written by `iei embed --ray`): "
                    "--overwrite removes only its results; nothing was removed"
                )
    for name in [*results, *parquet_files(filesystem, folder, ".parquet.partial")]:
        filesystem.delete_file(name)
    log.info("--overwrite: removed the %d result files in %s", len(results), out)
    return set()


def job_identity(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs' vectors belong in one folder: the model (in Ray's actors, or the
    service's and which of its models) and whether they are normalised. The precision is not
    in it: float32 and bf16 vectors of one model agree to about 0.999."""
    source = {"model": args.model} if args.url is None else {"url": args.url, "model": args.model}
    return {**source, "normalize": not args.raw}


def check_same_job(filesystem: Any, folder: str, out: str, job: dict[str, Any] | None) -> None:
    """Refuse a --resume whose vectors would not be of the same model as those written: a
    resumed job with another --model mixed two models' vectors in one folder. A folder written
    before JOB_FILE existed is taken as it is."""
    if job is None:
        return
    try:
        with filesystem.open_input_stream(f"{folder}/{JOB_FILE}") as stream:
            written = json.loads(stream.read())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise BulkError(f"{out}/{JOB_FILE}: unreadable ({exc}); nothing was removed") from None
    if written != job:
        raise BulkError(
            f"{out} holds vectors of {describe_job(written)}; this job makes {describe_job(job)}: "
            "resume with the same --model/--url/--raw, or start again with --overwrite"
        )


def describe_job(job: dict[str, Any]) -> str:
    where = f"the service {job['url']}, model {job.get('model') or 'its default'}" \
        if "url" in job else f"model {job.get('model')}"  # fmt: skip
    return f"{where} ({'normalised' if job.get('normalize') else 'raw'})"


def record_job(out: str, job: dict[str, Any]) -> None:
    """JOB_FILE in the output folder: what its vectors are, for a later --resume to check."""
    filesystem, folder = output_location(out)
    filesystem.create_dir(folder, recursive=True)
    with filesystem.open_output_stream(f"{folder}/{JOB_FILE}") as stream:
        stream.write(json.dumps(job, sort_keys=True).encode())


# --- Ray ---------------------------------------------------------------------------------------


def connect(address: str, cores: int) -> bool:
    """Start a local Ray on this machine's cores, or join a cluster; False when this process
    already had Ray (then it is left running)."""
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=cores, include_dashboard=False)  # its workers inherit our environment
    else:
        ray.init(address=address, runtime_env={"env_vars": forwarded_environment()})
    return True


def forwarded_environment() -> dict[str, str]:
    """What the actors on a cluster's nodes must see of this driver's environment: the model's
    settings as set here (IEI_POOLING, IEI_DTYPE, IEI_MAX_IMAGE_PIXELS ...) and the hub's token.
    A node's workers see only that node's environment: an `IEI_POOLING=cls` given to the driver
    was silently not the actors' pooling. The pods' own variables (a RayJob's Secret) stay."""
    from ..settings import MODEL, read_by

    names = {name for entry in read_by(MODEL).values() for name in (entry.env, *entry.aliases)}
    names |= set(HUB_TOKENS)
    # A driver submitted as a Ray job (a RayJob) has its job's runtime_env, whose env_vars are
    # also in our environment: ray.init refuses a runtime_env that names one of them again.
    names -= set(submitted_job_env_vars())
    return {name: value for name, value in os.environ.items() if name in names}


def submitted_job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env this driver was submitted with (Ray's job manager puts
    the job's config in RAY_JOB_CONFIG_JSON_ENV_VAR), or none."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        runtime_env = json.loads(config).get("runtime_env") if config else None
    except (ValueError, AttributeError):
        return {}
    env_vars = runtime_env.get("env_vars") if isinstance(runtime_env, dict) else None
    return env_vars if isinstance(env_vars, dict) else {}


def warn_of_a_local_out(out: str) -> None:
    """A local --out on a cluster of several nodes: each node's write tasks write to their own
    disk, and the summary and --resume see the driver's share only, unless every node mounts
    that folder (a shared file system, which cannot be told from here)."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1 and locate(out).filesystem is None:
        log.warning(
            "--out %s is a local folder and Ray has %d nodes: each node writes its rows to its "
            "own disk unless every node mounts that folder; give a shared store (s3://, gs://) "
            "or a shared mount", out, nodes,
        )  # fmt: skip


def layout(model_mode: bool, actors: int | None, actor_cpus: int | None) -> tuple[int, float, int]:
    """(actors, GPUs per actor, CPUs per actor) from the cluster: a model actor per GPU where
    there are GPUs, else one per node using the node's cores; a service actor per node."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = int(sum(n.get("GPU", 0) for n in nodes))
    if not model_mode:
        return actors or len(nodes) or 1, 0, 0
    if gpus:
        return actors or gpus, 1, actor_cpus or 1
    # The nodes that run tasks: a head started with no CPU (the manifest's) runs no actor.
    workers = [n for n in nodes if n.get("CPU", 0) >= 1] or nodes
    node_cpus = min(int(n.get("CPU", 1)) for n in workers) if workers else 1
    count = actors or len(workers) or 1
    per_node = math.ceil(count / max(1, len(workers)))
    return count, 0, actor_cpus or max(1, node_cpus // per_node)


def requests_in_flight(actors: int, concurrency: int) -> tuple[int, int]:
    """(service actors, requests in flight each): never more than `concurrency` in all (one
    actor per request at most; the rest of the division is left unused)."""
    actors = max(1, min(actors, concurrency))
    return actors, max(1, concurrency // actors)


def path_keys(paths: Iterable[str]) -> np.ndarray:
    """64-bit keys of `paths` (BLAKE2b), in their order. A resume of 10M files hands the
    listing tasks 80 MB of sorted keys, shared through Ray's object store without a copy, where
    a set of the paths was 1.3 GB pickled into each task; two paths share a key with a chance of
    about 10M² / 2⁶⁵ (3e-6) for the whole resume."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
         for p in paths),
        dtype=np.uint64,
    )  # fmt: skip


def sorted_keys(paths: Iterable[str]) -> np.ndarray:
    keys = path_keys(paths)
    keys.sort()
    return keys


def expand(row: dict[str, Any], done: Any) -> list[dict[str, Any]]:
    """A listing row (a file, or a folder to walk) -> the files still to embed. `done`: the
    sorted keys of the files embedded already (`sorted_keys`), or Ray's reference to them."""
    if not isinstance(done, np.ndarray):
        import ray

        done = ray.get(done)  # zero-copy: the array stays in the object store
    names = walk_folder(row["name"]) if row["folder"] else [row["name"]]
    if not len(done) or not names:
        return [{"path": name} for name in names]
    keys = path_keys(names)
    at = np.minimum(np.searchsorted(done, keys), len(done) - 1)
    embedded = done[at] == keys
    return [{"path": name} for name, seen in zip(names, embedded, strict=True) if not seen]


def read_batch(batch: pa.Table) -> pa.Table:
    """Paths -> their content, SHA-256, or why they could not be read."""
    reads = list(read_files(batch.column("path").to_pylist()))
    # large_binary: a block's files together may pass binary's 2 GiB.
    return batch.append_column("bytes", pa.array([r.content for r in reads], pa.large_binary())) \
        .append_column("sha256", pa.array([r.sha256 for r in reads], pa.string())) \
        .append_column("error", pa.array([r.error for r in reads], pa.string()))  # fmt: skip


def pipeline(
    files: list[str], folders: list[str], done: set[str], out: str, args: argparse.Namespace
) -> None:
    """Build and run the job; returns when every row is written."""
    import ray
    import ray.data

    items = [{"name": f, "folder": False} for f in files if f not in done]
    items += [{"name": d, "folder": True} for d in folders]
    if not items:
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = not args.no_progress
    # An actor takes a block whole: small blocks spread the images of one folder over the
    # actors (a repartition step would need a CPU of its own, which the actors hold).
    context.target_max_block_size = min(context.target_max_block_size or BLOCK_BYTES, BLOCK_BYTES)
    # Listing, reading and writing ask Ray for no CPU of their own: they mostly wait on the
    # store, and the model's actors are sized to the cores; their tasks are bounded instead.
    paths = ray.data.from_items(items, override_num_blocks=min(len(items), 200)).flat_map(
        partial(expand, done=ray.put(sorted_keys(done))), num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=LIST_TASKS),
    )  # fmt: skip
    model_mode = args.url is None  # else --model names one of the service's models
    actors, gpus, cpus = layout(model_mode, args.actors, args.actor_cpus)
    per_actor = 1
    if not model_mode:
        actors, per_actor = requests_in_flight(actors, args.concurrency)
    batch = args.batch_size * (1 if model_mode else per_actor)
    contents = paths.map_batches(
        read_batch, batch_size=batch, batch_format="pyarrow", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=READ_TASKS),
    )  # fmt: skip
    log.info(
        "ray: %d %s actor(s)%s", actors, "model" if model_mode else "service",
        f", {gpus:g} GPU and {cpus} CPU each" if model_mode
        else f", {per_actor} request(s) in flight each",
    )  # fmt: skip
    if model_mode:
        vectors = embed_dataset(
            contents, model=args.model, actors=actors, batch_size=args.batch_size,
            normalize=not args.raw, num_gpus=gpus, num_cpus=cpus,
            threads=None if gpus else cpus, dtype=args.dtype,
        )  # fmt: skip
    else:
        vectors = embed_dataset(
            contents, url=args.url, actors=actors, batch_size=args.batch_size,
            normalize=not args.raw, api_key=args.api_key, in_flight=per_actor,
            retries=RAY_RETRIES if args.retries is None else args.retries, served_model=args.model,
        )  # fmt: skip
    filesystem, folder = output_location(out)
    rows_per_file = ROWS_PER_FILE_CPU if model_mode and not gpus else ROWS_PER_FILE
    vectors.write_parquet(
        folder, filesystem=filesystem, min_rows_per_file=rows_per_file,
        ray_remote_args={"num_cpus": 0},
    )  # fmt: skip


def run_ray_embed(args: argparse.Namespace) -> int:
    """`iei embed ... --ray`: exit status 0 when the job ran (skipped files are reported), 2 for
    a bad argument, 1 when the job failed (what was written stays; continue with --resume), 130
    for Ctrl-C, whenever it comes."""
    try:
        return run_job(args)
    except KeyboardInterrupt:
        log.error("interrupted: what was written stays in %s; continue with --resume", args.out)
        return 130


def run_job(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = str(args.out)
    try:
        if args.model is None and args.url is None:
            raise BulkError("--ray needs --model MODEL (the model in Ray's actors) or --url URL")
        # The roots, one level deep, before Ray starts: a wrong path fails at once, and before
        # --overwrite removes anything.
        files, folders = list_roots(str(p) for p in args.paths)
        job = job_identity(args)
        done = prepare_output(out, args.resume, args.overwrite, job)
        record_job(out, job)
    except (BulkError, OSError, pa.ArrowException) as exc:  # pyarrow's: a URI it cannot parse
        log.error("%s", exc)
        return 2
    cores = available_cores()
    try:
        owned = connect(args.ray, cores)
    except Exception as exc:  # ray.init's many ways to fail: one line
        log.error("cannot start or join Ray (--ray %s): %s", args.ray, exc)
        return 2
    warn_of_a_local_out(out)
    try:
        pipeline(files, folders, done, out, args)
    except BulkError as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:
        log.error("the job failed: %s (what was written stays in %s; continue with --resume)",
                  first_line(exc), out)  # fmt: skip
        return 1
    finally:
        if owned:
            import ray

            ray.shutdown()
    try:
        return summarize(out, done, started, args.paths)
    except (BulkError, OSError, pa.ArrowException) as exc:  # the job ran; its count did not
        log.error("the job ran, but its results could not be counted: %s", exc)
        return 1


def summarize(out: str, done: set[str], started: float, roots: Iterable[Any]) -> int:
    filesystem, folder = output_location(out)
    written = read_written(filesystem, folder, repair=False, paths=False)
    for path, reason in written.errors[:ERRORS_SHOWN]:
        log.warning("skipped %s: %s", path, reason)
    if len(written.errors) > ERRORS_SHOWN:
        log.warning("... and %d more skipped (the rows with an `error` in %s)",
                    len(written.errors) - ERRORS_SHOWN, out)  # fmt: skip
    if not written.vectors and not written.errors:
        log.error("no image files in %s", ", ".join(map(str, roots)))
        return 2
    embedded = written.vectors - len(done)
    seconds = time.perf_counter() - started
    rate = embedded / seconds if seconds > 0 else 0.0
    sys.stdout.write(
        f"embedded {embedded} images, skipped {len(written.errors)}, {len(done)} already done, "
        f"in {seconds:.1f} s ({rate:.1f} images/s) -> {out} ({written.vectors} vectors)\n"
    )
    return 0


def first_line(exc: BaseException) -> str:
    """The task's own error in one line: Ray wraps it (RayTaskError, UserCodeException) with the
    remote traceback in the text, so the last `SomeError: message` line of the chain is it."""
    texts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(f"{type(current).__name__}: {current}")
        inner = getattr(current, "cause", None) or current.__cause__
        current = inner if isinstance(inner, BaseException) else None
    errors = [
        line.strip()
        for text in texts
        for line in text.splitlines()
        if ERROR_LINE.match(line.strip())
        and "UserCodeException" not in line
        and not line.strip().startswith(("RayTaskError", "ray::"))
    ]
    return errors[-1] if errors else texts[-1].splitlines()[0]


def available_cores() -> int:
    """This machine's usable cores (affinity and cgroup quota), by the model repository's rule."""
    from ..launcher.models import repository_module
    from .actors import model_repository

    resources = repository_module(model_repository() / "iei_runtime" / "resources.py")
    return int(resources.available_cores()) if resources is not None else 1
