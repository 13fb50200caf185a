"""The split layout's two stages (IEI_TRITON_LAYOUT=split; `iei` is then an ensemble of them).

`iei_preprocess` runs on many single-threaded CPU instances (processes: no GIL shared) and turns
files into the processor's resized image, uint8, not yet normalised; `iei_encoder` runs on the
model's device with its own dynamic batcher, normalises there and runs the encoder, so the decoding
of the next batch overlaps this batch's forward pass. A JPEG that a tensor decoder may take crosses
as the file itself and is decoded, resized and normalised on the encoder's device
(jpeg_decoders.py). No Triton here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .embedder import Embedder, Preprocessor
from .images import InvalidImage
from .jpeg_decoders import JpegDecoder, JpegHeader, batchable_jpeg

PIXELS_NAME = "PIXELS"  # uint8 (3, H, W): the processor's resized image (zeros: see JPEG)
JPEG_NAME = "JPEG"  # the JPEG file when the encoder decodes it, else empty
# The processor's arguments that stop it before rescaling and normalising: its output stays
# uint8 (a quarter of float32 between the processes), and the encoder finishes it.
UINT8_PIXELS = {"do_rescale": False, "do_normalize": False}


def check_pixels_only(features: Mapping[str, torch.Tensor]) -> None:
    """The stages carry one tensor between them: uint8 pixel_values of (N, 3, H, W)."""
    pixels = features.get("pixel_values")
    if set(features) != {"pixel_values"} or pixels is None or pixels.dtype != torch.uint8:
        raise ValueError(
            f"its image processor returns {', '.join(sorted(features))}: the split layout carries "
            "pixel_values alone (IEI_TRITON_LAYOUT=single serves this model)"
        )


class PreprocessStage:
    """Files -> uint8 pixels (3, H, W), the file itself for the encoder to decode, or the reason
    an image has neither."""

    def __init__(self, preprocessor: Preprocessor, *, defer_jpegs: bool) -> None:
        self.preprocessor = preprocessor
        self.defer_jpegs = defer_jpegs
        blank = preprocessor.blank(1)
        check_pixels_only(blank)
        self.shape = tuple(blank["pixel_values"].shape[1:])

    def run(self, files: Sequence[bytes]) -> list[np.ndarray | bytes | InvalidImage]:
        limit = self.preprocessor.max_image_pixels
        deferred = {i for i, f in enumerate(files) if self.defer_jpegs and batchable_jpeg(f, limit)}
        rest = [i for i in range(len(files)) if i not in deferred]
        results: list[Any] = [files[i] if i in deferred else None for i in range(len(files))]
        prepared = self.preprocessor.prepare([files[i] for i in rest])
        for i, result in zip(rest, prepared, strict=True):
            results[i] = result if isinstance(result, InvalidImage) else pixels_of(result)
        return results

    def outputs(self, results: Sequence[np.ndarray | bytes]) -> tuple[np.ndarray, np.ndarray]:
        """One request's PIXELS (N, 3, H, W) and JPEG (N, 1) outputs."""
        pixels = np.zeros((len(results), *self.shape), dtype=np.uint8)
        files = np.full((len(results), 1), b"", dtype=np.object_)
        for i, result in enumerate(results):
            if isinstance(result, bytes):
                files[i, 0] = result
            else:
                pixels[i] = result
        return pixels, files


def pixels_of(features: Mapping[str, torch.Tensor]) -> np.ndarray:
    return features["pixel_values"].numpy(force=True)


class EncodeStage:
    """uint8 pixels (and JPEG files) of a dynamic batch -> one vector per image, on the device."""

    def __init__(self, embedder: Embedder, decoder: JpegDecoder | None) -> None:
        self.embedder = embedder
        # Its own processor calls (a JPEG decoded here, or PIL's fallback) stop at uint8 too.
        embedder.processor_options = UINT8_PIXELS
        self.decoder = decoder
        self.device = embedder.preprocess_device or embedder.device

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> the model's input, exactly as the processor would finish it."""
        p: Any = self.embedder.processor
        return p.rescale_and_normalize(  # type: ignore[no-any-return]
            pixels.to(self.device).float(),
            p.do_rescale, p.rescale_factor, p.do_normalize, p.image_mean, p.image_std,
        )  # fmt: skip

    def warm_up(self, shape: Sequence[int]) -> None:
        """A pass at the largest forward batch and one of a single image: the shapes of real
        executions, so their kernels and buffers are chosen before the first request."""
        for count in sorted({1, self.embedder.forward_batch_size}):
            self.embedder.forward(
                {"pixel_values": self.normalise(torch.zeros((count, *shape), dtype=torch.uint8))}
            )

    def embed(self, pixels: np.ndarray, files: Sequence[bytes]) -> list[np.ndarray | InvalidImage]:
        batch = torch.from_numpy(np.array(pixels))  # a copy: Triton's input is read-only
        results: list[Any] = [None] * len(files)
        deferred = [i for i, f in enumerate(files) if f]
        if deferred:
            batch = batch.to(self.device)
            decoded = self.decode([files[i] for i in deferred], tuple(batch.shape[2:]))
            for i, image in zip(deferred, decoded, strict=True):
                if isinstance(image, InvalidImage):
                    results[i] = image
                else:
                    batch[i] = image
        good = [i for i, r in enumerate(results) if r is None]
        if good:
            chosen = batch[good] if len(good) < len(files) else batch
            vectors = self.embedder.forward({"pixel_values": self.normalise(chosen)})
            for i, vector in zip(good, vectors, strict=True):
                results[i] = vector
        return results

    def decode(self, files: Sequence[bytes], size: tuple[int, ...]) -> list[Any]:
        """JPEG files -> uint8 (3, H, W) resized on the device, or why not. A file the tensor
        decoder refuses (or that came without one) goes through PIL as in the other layout."""
        headers = [batchable_jpeg(f, self.embedder.max_image_pixels) for f in files]
        results: list[Any] = [None] * len(files)
        if self.decoder is not None:
            ready = [i for i, h in enumerate(headers) if h is not None]
            for group in budget_groups(ready, headers, self.embedder.budget.capacity):
                with self.embedder.budget.hold(sum(headers[i].pixels for i in group)):  # type: ignore[union-attr]
                    images = self.decoder.decode(
                        [files[i] for i in group], [headers[i] for i in group]
                    )
                    done = [(i, im) for i, im in zip(group, images, strict=True) if im is not None]
                    if done:
                        resized = self.resize([im for _, im in done])
                        for (i, _), image in zip(done, resized, strict=True):
                            results[i] = image
        rest = [i for i, r in enumerate(results) if r is None]
        for i, result in zip(rest, self.embedder.prepare([files[i] for i in rest]), strict=True):
            results[i] = result if isinstance(result, InvalidImage) else result["pixel_values"]
        return results

    def resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded images -> the processor's resize and crop, on the device, uint8."""
        options: dict[str, Any] = {"return_tensors": "pt", "device": self.device, **UINT8_PIXELS}
        with torch.inference_mode():
            pixels: torch.Tensor = self.embedder.processor(images=images, **options)["pixel_values"]
        return pixels


def budget_groups(
    indices: Sequence[int], headers: Sequence[JpegHeader | None], capacity: int
) -> list[list[int]]:
    """Consecutive groups of files whose full-size pixels fit the decode budget together (a file
    over the whole budget alone), so that decoding a batch never holds more than the budget."""
    groups: list[list[int]] = []
    held = capacity + 1
    for i in indices:
        pixels = headers[i].pixels  # type: ignore[union-attr]
        if held + pixels > capacity:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += pixels
    return groups
