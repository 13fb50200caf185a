"""Index the sample photos in a vector index (FAISS), then search it by text and by image.

Needs a model with a text tower (CLIP, SigLIP, SigLIP2: texts and images share one space), e.g.
IMAGE_EMBEDDING_MODEL=google/siglip2-base-patch16-224 make run, and `pip install 'iei[tools]'`
(faiss-cpu).

python examples/text_search_example.py [--url http://127.0.0.1:8000] [--api-key KEY]
    [--query "a cat"] [--index photos.faiss] [--model NAME]   (one of IEI_MODELS; default: the
    server's default model)
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np
from iei.client import IEIClient, IEIError

IMAGES = Path(__file__).parent / "images"


def build_index(vectors: np.ndarray, path: Path) -> faiss.Index:
    """Exact inner-product search over unit vectors (= cosine), with row ids, saved to `path`."""
    index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    faiss.write_index(index, str(path))
    return faiss.read_index(str(path))  # as a later run would open it


def show(title: str, index: faiss.Index, query: np.ndarray, names: list[str], top: int) -> None:
    scores, rows = index.search(query.reshape(1, -1).astype(np.float32), top)
    print(title)
    for score, row in zip(scores[0], rows[0], strict=True):
        print(f"  {score:.3f}  {names[row]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("IEI_API_KEY"))
    parser.add_argument("--query", default="a photo of a cat")
    parser.add_argument("--index", type=Path, help="where to keep the index (default: a temp dir)")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--model", help="a served model with a text tower (GET /v1/models)")
    args = parser.parse_args()

    paths = sorted(p for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png"})
    names = [p.name for p in paths]
    try:
        with IEIClient(args.url, api_key=args.api_key, model=args.model) as client:
            # The default model's facts (another model may not be loaded yet: the service
            # refuses its texts with a 422 if it has no text tower).
            modalities = ["text"] if args.model else client.info().get("modalities")
            if modalities is None:  # /info knows the model's facts once Triton has it ready
                print("the model is not ready yet (GET /health): try again", file=sys.stderr)
                return 1
            if "text" not in modalities:
                print("this model embeds images only: serve CLIP, SigLIP or SigLIP2 to search by "
                      "text", file=sys.stderr)  # fmt: skip
                return 2
            images = client.embed(paths)  # unit length: inner product = cosine
            text = client.embed_texts([args.query])[0]
    except IEIError as exc:  # .status, .error_type, .message as the server sent them
        print(f"error: {exc}", file=sys.stderr)
        return 1

    folder = Path(tempfile.mkdtemp()) if args.index is None else args.index.parent
    path = args.index or folder / "photos.faiss"
    index = build_index(images, path)
    path.with_suffix(".names.json").write_text(json.dumps(names))  # row id -> file
    print(f"indexed {index.ntotal} images ({images.shape[1]} dimensions) in {path}")
    show(f"by text {args.query!r}:", index, text, names, args.top)
    show(f"by image {names[0]}:", index, images[0], names, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
