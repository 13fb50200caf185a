"""Embed every image of a folder with one POST /embed request.

python examples/request_example_batch.py [--url http://127.0.0.1:8000] [--images DIR]
"""

import argparse
import base64
import sys
from pathlib import Path

import httpx

IMAGES = Path(__file__).parent / "images"
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def encode_image(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", type=Path, default=IMAGES)
    args = parser.parse_args()

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in SUFFIXES)
    with httpx.Client(base_url=args.url, timeout=120) as client:
        if client.get("/health").status_code != 200:
            print("the service is not healthy", file=sys.stderr)
            return 1
        response = client.post("/embed", json={"inputs": [encode_image(p) for p in paths]})
        if response.status_code != 200:
            print(f"error {response.status_code}: {response.json()}", file=sys.stderr)
            return 1
        embeddings = response.json()

    for path, vector in zip(paths, embeddings, strict=True):
        print(f"{path.name}: {len(vector)} dimensions, first values {vector[:3]}")
    print(f"embedded {len(embeddings)} images in one request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
