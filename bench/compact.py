"""`python -m bench.compact`: what Cohere's compact embedding types (`POST /v2/embed`) do to
retrieval. The sample photos (examples/images) and variants of each (crops, flips, rotations,
colour, JPEG quality) are embedded through the served stack in every type; each image is a query
against all the others, and the top 10 by each compact type is compared with the top 10 by the
float vectors (overlap, and whether the first hit is the same). Int8 and uint8 rank by cosine of
their integers; binary and ubinary by Hamming distance; base64 decodes to the float vectors.

    .venv/bin/python -m bench.compact [--family clip]

The model is a tiny random one (tests/tiny_models.py; no trained weights here): its vectors are
of 16 dimensions (CLIP's projection), where one bit per dimension keeps little, so the figures
are a pessimistic floor for binary and say nothing exact about a trained 512- to 1152-dimension
model. Writes its part ("compact") of docs/benchmarks/results.json and re-renders
docs/benchmarks.md.
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
from PIL import Image, ImageOps

from . import report
from .workload import PHOTOS, ROOT, ServedStack

DOCS = ROOT / "docs"
TOP = 10
KINDS = ("int8", "uint8", "binary", "ubinary", "base64")
CHUNK = 32  # inputs per request (under IEI_MAX_CLIENT_BATCH_SIZE)


def log(message: str) -> None:
    print(f"[bench.compact] {message}", file=sys.stderr, flush=True)  # noqa: T201


def variants(photo: Image.Image) -> list[Image.Image]:
    """The photo and 18 edits of it: what a photo library holds of one picture."""
    w, h = photo.size
    out = [photo, ImageOps.mirror(photo), ImageOps.grayscale(photo).convert("RGB")]
    for box in (
        (0, 0, w * 3 // 4, h * 3 // 4),
        (w // 4, h // 4, w, h),
        (w // 8, h // 8, w * 7 // 8, h * 7 // 8),
        (0, h // 4, w, h),
    ):
        out.append(photo.crop(box))
    out += [photo.rotate(angle, expand=True) for angle in (5, -5, 90)]
    out += [Image.eval(photo, lambda v, f=f: min(255, int(v * f))) for f in (0.6, 0.8, 1.2)]
    out += [ImageOps.autocontrast(photo), ImageOps.posterize(photo, 4)]
    out += [photo.resize((w // 2, h // 2)), photo.resize((w // 4, h // 4))]
    out += [ImageOps.equalize(photo), ImageOps.solarize(photo, 200)]
    return out  # fmt: skip


def corpus() -> list[tuple[str, bytes]]:
    images = []
    for path in sorted(PHOTOS.iterdir()):
        if path.suffix.lower() not in {".jpg", ".png"}:
            continue
        photo = Image.open(path).convert("RGB")
        for i, image in enumerate(variants(photo)):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=70 if i % 2 else 90)
            images.append((f"{path.stem}#{i}", buffer.getvalue()))
    return images


def embed(url: str, model: str, files: list[bytes]) -> dict[str, list[Any]]:
    import httpx

    found: dict[str, list[Any]] = {kind: [] for kind in ("float", *KINDS)}
    for start in range(0, len(files), CHUNK):
        uris = [
            "data:image/jpeg;base64," + base64.b64encode(f).decode()
            for f in files[start : start + CHUNK]
        ]
        body = {"model": model, "input_type": "image", "images": uris,
                "embedding_types": list(found)}  # fmt: skip
        response = httpx.post(f"{url}/v2/embed", json=body, timeout=300)
        response.raise_for_status()
        for kind, rows in response.json()["embeddings"].items():
            found[kind] += rows
    return found


def similarities(kind: str, rows: list[Any]) -> np.ndarray:
    """All-pairs similarity as a client of each type would rank."""
    if kind in ("binary", "ubinary"):
        packed = np.array(rows, dtype=np.int16) % 256  # binary's signed bytes, as unsigned
        bits = np.unpackbits(packed.astype(np.uint8), axis=1).astype(np.int32)
        return -(bits[:, None, :] != bits[None, :, :]).sum(2).astype(np.float64)  # -Hamming
    if kind == "base64":
        vectors = np.array([np.frombuffer(base64.b64decode(s), "<f4") for s in rows])
    else:
        vectors = np.array(rows, dtype=np.float64) - (128 if kind == "uint8" else 0)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


def top(similarity: np.ndarray) -> np.ndarray:
    """Each row's TOP best others (itself left out; ties in input order)."""
    masked = similarity.copy()
    np.fill_diagonal(masked, -np.inf)
    return np.argsort(-masked, axis=1, kind="stable")[:, :TOP]


def compare(found: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    reference = top(similarities("float", found["float"]))
    rows = {}
    for kind in KINDS:
        ranked = top(similarities(kind, found[kind]))
        overlap = [len(set(a) & set(b)) / TOP for a, b in zip(reference, ranked, strict=True)]
        rows[kind] = {
            "overlap": float(np.mean(overlap)),
            "overlap_min": float(np.min(overlap)),
            "first_same": float(np.mean(reference[:, 0] == ranked[:, 0])),
            "bytes": len(found[kind][0]) if kind != "base64" else len(found["float"][0]) * 4,
        }
    return rows


def run(work: Path, family: str) -> dict[str, Any]:
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tiny_model

    model_dir = build_tiny_model(family, work / family)
    images = corpus()
    with ServedStack(model_dir, work / f"{family}.log", IEI_WORKERS="1") as stack:
        model = httpx.get(f"{stack.url}/v1/models", timeout=30).json()["data"][0]["id"]
        found = embed(stack.url, model, [data for _, data in images])
    dimension = len(found["float"][0])
    log(f"{len(images)} images, {dimension} dimensions")
    return {
        "meta": {
            "command": "python -m bench.compact " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        },
        "family": family,
        "images": len(images),
        "photos": len(images) // len(variants(Image.new("RGB", (8, 8)))),
        "dimension": dimension,
        "rows": compare(found),
    }


def section(results: dict[str, Any]) -> str:
    meta, rows = results["meta"], results["rows"]
    table = report.table(
        ["type", "bytes per vector", f"top-{TOP} overlap with float (mean)", "worst query",
         "same first hit"],
        [[kind, str(r["bytes"]), f"{r['overlap']:.3f}", f"{r['overlap_min']:.1f}",
          f"{r['first_same']:.3f}"] for kind, r in rows.items()],
    )  # fmt: skip
    return f"""
## Compact vectors: retrieval against float

`{meta["command"].strip()}`, {meta["date"]}. The tiny random {results["family"]}
(tests/tiny_models.py: {results["dimension"]} dimensions; no trained weights can be fetched here),
served by `iei serve`; {results["images"]} images: the {results["photos"]} sample photos and 18
versions of each (crops, flip, grey, rotations, brightness, contrast, posterize, halves, JPEG
quality 70 and 90). Each image queries all the others through `POST /v2/embed`'s types: the
top {TOP} by each type (int8 and uint8 by the cosine of their integers, binary and ubinary by
Hamming distance, ties in input order) against the top {TOP} by the float vectors. A random model
puts every photo close to every other, and {results["dimension"]} dimensions give binary as many
bits: read the binary rows as a floor, not as what a trained 512- to 1152-dimension model
keeps; int8's rounding error shrinks with more dimensions (its cosine to float is >= 0.99 at
512, tests/server/test_cohere.py). Exact figures, not timings: the shared machine's load does
not change them.

{table}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compact", description=__doc__)
    parser.add_argument("--family", default="clip", help="tiny model family (tests/tiny_models)")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for benchmarks.md")
    args = parser.parse_args(argv)
    results_path = args.out / "benchmarks" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="iei-bench-") as tmp:
        results["compact"] = run(Path(tmp), args.family)
    for kind, row in results["compact"]["rows"].items():
        log(f"{kind}: top-{TOP} overlap {row['overlap']:.3f}, first hit {row['first_same']:.3f}")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
    report.write(results, args.out)
    log(f"wrote {args.out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
