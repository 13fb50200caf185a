"""Embed the sample photos through the OpenAI-compatible route with the `openai` package.

python examples/openai_client_example.py [--url http://127.0.0.1:8000] [--api-key KEY]
    [--model NAME]   (default: the name the service reports in GET /info)
"""

import argparse
import base64
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import openai

IMAGES = Path(__file__).parent / "images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    # The SDK insists on a key; any value does unless the service sets IEI_API_KEY.
    parser.add_argument("--api-key", default=os.environ.get("IEI_API_KEY") or "unused")
    parser.add_argument("--model", help="the served model's name (default: ask GET /info)")
    args = parser.parse_args()
    if args.model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"}
        try:
            info = httpx.get(f"{args.url}/info", headers=headers, timeout=30)
        except httpx.TransportError as exc:
            print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
            return 1
        if info.status_code != 200:  # a wrong key: 401 and IEI's error body
            print(f"GET /info: error {info.status_code}: {info.text}", file=sys.stderr)
            return 1
        args.model = info.json()["served_model_name"]

    paths = sorted(IMAGES.glob("*.jpg"))
    images = [base64.b64encode(p.read_bytes()).decode("ascii") for p in paths]
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    try:
        # The SDK asks for base64-encoded float32 vectors and decodes them; IEI supports both.
        result = client.embeddings.create(model=args.model, input=images)
    except openai.APIStatusError as exc:  # OpenAI's envelope: exc.status_code, exc.body
        print(f"error {exc.status_code}: {exc.body}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as exc:
        print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1

    vectors = np.array([item.embedding for item in result.data], dtype=np.float32)
    for path, vector in zip(paths, vectors, strict=True):
        print(f"{path.name}: norm {np.linalg.norm(vector):.3f}, first values {vector[:3]}")
    print(f"embedded {len(vectors)} images with model {result.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
