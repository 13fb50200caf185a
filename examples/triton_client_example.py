"""Call Triton directly (no HTTP frontend): the `iei` model over HTTP or gRPC.

The model takes the encoded image files as BYTES (`IMAGE`, one per row) and returns raw,
not normalised, float32 vectors (`EMBEDDING`).

    python examples/triton_client_example.py --protocol grpc --url 127.0.0.1:8101
    python examples/triton_client_example.py --protocol http --url 127.0.0.1:8100
"""

import argparse
import sys
from pathlib import Path

import numpy as np

IMAGES = Path(__file__).parent / "images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    parser.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8101 / 8100)")
    args = parser.parse_args()
    if args.protocol == "grpc":
        import tritonclient.grpc as triton
    else:
        import tritonclient.http as triton
    url = args.url or ("127.0.0.1:8101" if args.protocol == "grpc" else "127.0.0.1:8100")

    paths = sorted(IMAGES.glob("*.jpg"))
    images = np.array([[p.read_bytes()] for p in paths], dtype=np.object_)  # shape (N, 1)
    client = triton.InferenceServerClient(url)
    request = triton.InferInput("IMAGE", list(images.shape), "BYTES")
    request.set_data_from_numpy(images)
    result = client.infer("iei", [request], outputs=[triton.InferRequestedOutput("EMBEDDING")])
    vectors = result.as_numpy("EMBEDDING")

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    print(f"{len(paths)} images -> embeddings of shape {vectors.shape}")
    print("cosine similarity:")
    for path, row in zip(paths, unit @ unit.T, strict=True):
        print(f"  {path.stem:>10}: " + " ".join(f"{v:5.2f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
