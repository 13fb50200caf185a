"""Embed every image of a folder with one POST /embed request.

python examples/request_example_batch.py [--url http://127.0.0.1:8000] [--images DIR]
    [--api-key KEY]   (default: $IEI_API_KEY; needed when the service sets one)
"""

import argparse
import base64
import os
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
    parser.add_argument("--api-key", default=os.environ.get("IEI_API_KEY"))
    args = parser.parse_args()

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in SUFFIXES)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=120) as client:
            if client.get("/health").status_code != 200:
                print("the service is not healthy", file=sys.stderr)
                return 1
            response = client.post("/embed", json={"inputs": [encode_image(p) for p in paths]})
    except httpx.TransportError as exc:
        print(f"cannot reach {args.url}: {exc!r}", file=sys.stderr)
        return 1
    if response.status_code != 200:  # IEI's JSON error body (a proxy's page is text)
        print(f"error {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    embeddings = response.json()

    for path, vector in zip(paths, embeddings, strict=True):
        print(f"{path.name}: {len(vector)} dimensions, first values {vector[:3]}")
    print(f"embedded {len(embeddings)} images in one request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
