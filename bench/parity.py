"""How close IEI's vectors are to the original IEI service's, on the sample photos.

    .venv/bin/python -m bench.parity --original DIR vit-base vit-tiny   # the bench's models
    .venv/bin/python -m bench.parity --original DIR /models/my-vit      # a model folder
    .venv/bin/python -m bench.parity --original DIR vit-base vit-tiny --record   # into the docs

Both services run for real on the same model folder, in float32: the original from a checkout of
lloydzhou/image-embedding-inference at 107b3f1 (one worker, the model under the hub id it insists
on, offline; see bench/original.py), IEI as `iei serve`. Each file goes in its own request to
each, and the table gives the cosine between the two raw vectors, or what a service answered
instead. The files: the sample photos of examples/images as they are, and three made from them
that the two services read differently (an EXIF orientation, transparency, CMYK). The last
column is the largest cosine between IEI's vectors of two *different* photos: what a cosine
means for this model (random weights put every photo close to every other).

`--record` keeps the run in docs/benchmarks/results.json (key `parity`) and rewrites
docs/benchmarks.md, whose section "IEI's vectors beside the original's" the README quotes.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import measure, report
from .original import OriginalServer
from .workload import MODELS, PHOTOS, ROOT, ServedStack, build_model

DOCS = ROOT / "docs"


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def inputs() -> dict[str, bytes]:
    """The sample photos as they are, then the three files the services read differently."""
    files = {
        p.name: p.read_bytes() for p in sorted(PHOTOS.iterdir()) if p.suffix in (".jpg", ".png")
    }
    coffee = Image.open(PHOTOS / "coffee.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to display"
    files["coffee.jpg, EXIF orientation 6"] = encode(coffee, "JPEG", quality=95, exif=exif)
    cat = Image.open(PHOTOS / "chelsea.jpg").convert("RGBA")
    alpha = np.full((cat.height, cat.width), 255, dtype=np.uint8)
    alpha[:, cat.width // 2 :] = 0  # right half transparent (its colours kept underneath)
    cat.putalpha(Image.fromarray(alpha))
    files["chelsea.jpg, right half transparent (PNG)"] = encode(cat, "PNG")
    files["coffee.jpg as CMYK JPEG"] = encode(coffee.convert("CMYK"), "JPEG", quality=95)
    return files


def embed_each(url: str, files: dict[str, bytes]) -> dict[str, np.ndarray | str]:
    """Each file in its own `/embed` request: its raw vector, `HTTP <status>`, or `no answer`
    (the original's unhandled errors can reset the connection)."""
    import httpx

    answers: dict[str, np.ndarray | str] = {}
    with httpx.Client(timeout=600) as client:
        for name, data in files.items():
            body = {"inputs": [base64.b64encode(data).decode()], "normalize": False}
            try:
                response = client.post(f"{url}/embed", json=body)
            except httpx.TransportError as exc:
                answers[name] = f"no answer ({type(exc).__name__})"
                continue
            if response.status_code == 200:
                answers[name] = np.array(response.json()[0], dtype=np.float64)
            else:
                answers[name] = f"HTTP {response.status_code}"
    return answers


def compare(
    ours: dict[str, np.ndarray | str], theirs: dict[str, np.ndarray | str]
) -> dict[str, Any]:
    rows = []
    for name in ours:
        a, b = ours[name], theirs[name]
        row: dict[str, Any] = {"input": name, "ours": "vector", "theirs": "vector", "cosine": None}
        if isinstance(a, str) or isinstance(b, str):
            row["ours"] = a if isinstance(a, str) else "vector"
            row["theirs"] = b if isinstance(b, str) else "vector"
        else:
            row["cosine"] = float(measure.cosine(a[None], b[None])[0])
        rows.append(row)
    photos = [v for k, v in ours.items() if k in PHOTO_NAMES and not isinstance(v, str)]
    between = [
        float(measure.cosine(photos[i][None], photos[j][None])[0])
        for i in range(len(photos))
        for j in range(i + 1, len(photos))
    ]
    return {"rows": rows, "between_photos_max": max(between) if between else None}


PHOTO_NAMES = {p.name for p in PHOTOS.iterdir()}


def run(checkout: Path, model: str, work: Path) -> dict[str, Any]:
    """One model: a bench model's name (built like the bench builds it) or a model folder."""
    folder = build_model(model, work / model) if model in MODELS else Path(model)
    files = inputs()
    env = {"IEI_DTYPE": "float32", "IEI_WORKERS": "1"}
    with ServedStack(folder, work / f"iei-{folder.name}.log", **env) as stack:
        ours = embed_each(stack.url, files)
    with OriginalServer(checkout, folder, work / folder.name, workers=1) as original:
        theirs = embed_each(original.url, files)
    return {"model": model if model in MODELS else folder.name, **compare(ours, theirs)}


def text(runs: list[dict[str, Any]]) -> str:
    return "\n".join(report.parity_table(r) for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.parity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("models", nargs="+", help=f"model folders, or {', '.join(MODELS)}")
    parser.add_argument(
        "--original",
        type=Path,
        required=True,
        help="a checkout of lloydzhou/image-embedding-inference at 107b3f1",
    )
    parser.add_argument("--record", action="store_true", help="write the docs (see above)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="iei-parity-") as tmp:
        runs = [run(args.original, model, Path(tmp)) for model in args.models]
    sys.stdout.write(text(runs) + "\n")
    if args.record:
        results_path = DOCS / "benchmarks" / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        results["parity"] = {
            "meta": {
                "command": " ".join([".venv/bin/python -m bench.parity", *(argv or sys.argv[1:])]),
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            },
            "runs": runs,
        }
        results_path.write_text(json.dumps(results, indent=1))
        report.write(results, DOCS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
