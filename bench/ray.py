"""`python -m bench.ray`: `iei embed --ray` on this machine's CPU, images/s with 1 and 2 actors,
the model in Ray's actors (`--model`) and Ray's actors calling the served stack (`--url`).

    .venv/bin/python -m bench.ray                 # ViT-B/16 (random weights: the real cost)
    .venv/bin/python -m bench.ray --images 64     # fewer images, a shorter run

One local Ray on the machine's cores for the whole run; each figure is a job as a user runs it
(list, read, embed, write Parquet). A job's wall time includes starting its actors (loading the
model), so every configuration runs twice, with `--images` and with a few: the rate is the
difference of images over the difference of seconds (the images/s once the actors are up), and
the start-up is reported beside it. Writes docs/benchmarks/ray.json and the table of
docs/bulk.md between its markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .workload import ROOT, SIZES, ServedStack, build_model, make_jpegs

DOCS = ROOT / "docs"
RESULTS = DOCS / "benchmarks" / "ray.json"
BEGIN, END = "<!-- bench.ray: begin -->", "<!-- bench.ray: end -->"
FEW = 8  # images of the short job (the actors' start-up)


class SkipServed(Exception):
    """--modes without url: no served stack."""


def log(message: str) -> None:
    sys.stderr.write(f"[bench.ray {time.strftime('%H:%M:%S')}] {message}\n")


def image_folder(root: Path, count: int) -> Path:
    """`count` camera-like 500x375 JPEGs (the sample photos, each with its own noise)."""
    folder = root / f"images-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    seed = 0
    while len(list(folder.iterdir())) < count:
        for blob in make_jpegs(SIZES[0], seed=seed):
            index = len(list(folder.iterdir()))
            if index < count:
                (folder / f"{index:06d}.jpg").write_bytes(blob)
        seed += 1
    return folder


def job(folder: Path, out: Path, source: list[str], actors: int) -> float:
    """One `iei embed --ray` (joining the bench's Ray), its wall time in seconds."""
    from iei.cli import main

    started = time.perf_counter()
    status = main(["embed", str(folder), "--out", str(out), "--ray", "local", "--overwrite",
                   "--actors", str(actors), "--no-progress", *source])  # fmt: skip
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"iei embed --ray failed ({status}) for {source} x{actors}")
    return seconds


def measure(work: Path, images: int, source: list[str], actors: int) -> dict[str, Any]:
    warm = work / f"warm{source[0]}"
    if not warm.exists():  # once per mode: caches (files, the model's first load, the server's)
        job(image_folder(work, FEW), work / "out", source, 1)
        warm.touch()
    load = os.getloadavg()[0]
    few = job(image_folder(work, FEW), work / "out", source, actors)
    many = job(image_folder(work, images), work / "out", source, actors)
    rate = (images - FEW) / (many - few) if many > few else float("nan")
    return {"actors": actors, "images": images, "seconds": many, "startup_s": few,
            "img_s": rate, "img_s_per_actor": rate / actors, "load": load,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    run = dict.fromkeys(r.get("command", meta["command"]) for r in results["rows"]) or {
        meta["command"]: None
    }
    commands = " and ".join(f"`{c}`" for c in run)
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), with "
        f"{commands}: {meta['model']}, {meta['images']} JPEGs of 500x375, "
        f"load average {meta['load_before']:.1f} before the run "
        f"({'a shared machine under load: compare the rows with each other, not with other machines' if meta['load_before'] > 1 else 'an idle machine'}).",  # noqa: E501
        "",
        "| mode | actors | CPUs each | images/s | images/s per actor | actors' start-up | "
        "load average | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['mode']} | {row['actors']} | {row['cpus_each']} | {row['img_s']:.1f} | "
            f"{row['img_s_per_actor']:.1f} | {row['startup_s']:.0f} s | "
            f"{row.get('load', float('nan')):.1f} | {row.get('date', meta['date'])} |"
        )
    return "\n".join(lines)


def write_docs(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    bulk = DOCS / "bulk.md"
    text = bulk.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    bulk.write_text(f"{head}{BEGIN}\n{render(results)}\n{END}{tail}")


def save(meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """This run's rows, and the rows of modes it did not run from the earlier ray.json."""
    kept = list(rows)
    if RESULTS.exists():
        run = {row["mode"] for row in rows}
        kept += [r for r in json.loads(RESULTS.read_text())["rows"] if r["mode"] not in run]
    kept.sort(key=lambda r: (r["mode"] != "--model", r["actors"]))
    write_docs({"meta": meta, "rows": kept})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray", description=__doc__)
    parser.add_argument("--images", type=int, default=96, help="images of the long job")
    parser.add_argument("--model", default="vit-base", help="bench model (vit-base, vit-tiny)")
    parser.add_argument("--render-only", action="store_true", help="rewrite docs from ray.json")
    parser.add_argument(
        "--modes", default="model,url",
        help="model, url or both; rows of a mode not run are kept from ray.json",
    )  # fmt: skip
    args = parser.parse_args()
    if args.render_only:
        write_docs(json.loads(RESULTS.read_text()))
        return 0
    import ray

    cores = len(os.sched_getaffinity(0))
    meta = {
        "command": " ".join([".venv/bin/python -m bench.ray", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": os.getloadavg()[0],
        "cpu": cpu_name(),
        "cores": cores,
        "model": "ViT-B/16" if args.model == "vit-base" else args.model,
        "images": args.images,
    }
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        """Into ray.json and docs/bulk.md at once (a later failure loses nothing)."""
        rows.append({**row, "command": meta["command"]})
        save(meta, rows)
        log(f"  {row['img_s']:.1f} img/s")

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as temp:
        work = Path(temp)
        model = build_model(args.model, work / args.model)
        # A small object store: the served stack's Python backend needs /dev/shm too.
        ray.init(num_cpus=cores, object_store_memory=512 * 2**20, include_dashboard=False,
                 logging_level="warning")  # fmt: skip
        try:
            for actors in (1, 2) if "model" in args.modes else ():
                log(f"model mode, {actors} actor(s)")
                row = measure(work, args.images, ["--model", str(model)], actors)
                keep({"mode": "--model", "cpus_each": max(1, cores // actors), **row})
            if "url" not in args.modes:
                raise SkipServed
            served = ServedStack(model, work / "serve.log")
            try:
                served.__enter__()
            except RuntimeError:
                log("iei serve did not start; its log ends with:\n" + tail(work / "serve.log"))
                raise
            try:
                for actors in (1, 2):
                    log(f"url mode, {actors} actor(s)")
                    # One request of 8 in flight per actor: this one server's queue must not
                    # hold a request past IEI_REQUEST_TIMEOUT (a fleet takes more).
                    source = ["--url", served.url, "--concurrency", str(actors)]
                    source += ["--batch-size", "8"]
                    row = measure(work, args.images, source, actors)
                    keep({"mode": "--url", "cpus_each": 0.5, **row})
            finally:
                served.__exit__()  # (entered once: `with` would start a second server)
        except SkipServed:
            pass
        finally:
            ray.shutdown()
    sys.stdout.write(RESULTS.read_text() + "\n")
    return 0


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
