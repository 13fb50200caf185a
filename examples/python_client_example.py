"""Embed the sample photos with the Python client, then rank them by similarity to one of them.

python examples/python_client_example.py [--url http://127.0.0.1:8000] [--api-key KEY]
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from iei.client import IEIClient, IEIError
from PIL import Image

IMAGES = Path(__file__).parent / "images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("IEI_API_KEY"))
    args = parser.parse_args()

    paths = sorted(IMAGES.glob("*.jpg"))
    # Paths, bytes, PIL images and uint8 arrays can be mixed in one call.
    flipped = Image.open(paths[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(Image.open(paths[0]).convert("L"))
    try:
        with IEIClient(args.url, api_key=args.api_key) as client:
            vectors = client.embed([*paths, flipped, pixels])  # unit length: dot = cosine
    except IEIError as exc:  # .status, .error_type, .message as the server sent them
        print(f"error: {exc}", file=sys.stderr)
        return 1

    names = [p.name for p in paths] + [f"{paths[0].name} (mirrored)", f"{paths[0].name} (grey)"]
    print(f"embedded {len(vectors)} images -> {vectors.shape} {vectors.dtype}")
    scores = vectors @ vectors[0]
    for index in np.argsort(-scores):
        print(f"  {scores[index]:.3f}  {names[index]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
