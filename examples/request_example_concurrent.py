"""Embed every image of a folder with one request per image, up to 8 in flight at once.

Triton's dynamic batcher merges the concurrent requests into batches on the server.

    python examples/request_example_concurrent.py [--url http://127.0.0.1:8000] [--images DIR]
        [--concurrency 8] [--api-key KEY]   (default: $IEI_API_KEY)
"""

import argparse
import asyncio
import base64
import os
import sys
from pathlib import Path

import httpx

IMAGES = Path(__file__).parent / "images"
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


async def embed_one(client: httpx.AsyncClient, path: Path, slots: asyncio.Semaphore) -> list[float]:
    async with slots:  # read and encode a file only when its request can go
        image = base64.b64encode(path.read_bytes()).decode("ascii")
        response = await client.post("/embed", json={"inputs": image})
    response.raise_for_status()
    return response.json()[0]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--api-key", default=os.environ.get("IEI_API_KEY"))
    args = parser.parse_args()

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in SUFFIXES)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    slots = asyncio.Semaphore(max(1, args.concurrency))
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=120) as client:
        try:
            if (await client.get("/health")).status_code != 200:
                print("the service is not healthy", file=sys.stderr)
                return 1
            vectors = await asyncio.gather(*(embed_one(client, p, slots) for p in paths))
        except httpx.HTTPStatusError as error:
            print(f"error {error.response.status_code}: {error.response.text}", file=sys.stderr)
            return 1
        except httpx.TransportError as error:
            print(f"cannot reach {args.url}: {error!r}", file=sys.stderr)
            return 1

    for path, vector in zip(paths, vectors, strict=True):
        print(f"{path.name}: {len(vector)} dimensions, first values {vector[:3]}")
    print(f"embedded {len(vectors)} images in {len(vectors)} requests, {args.concurrency} at once")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
