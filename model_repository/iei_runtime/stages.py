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
from typing import Any, NamedTuple

import numpy as np
import torch

from .embedder import Embedder, Preprocessor
from .images import InvalidImage
from .jpeg_decoders import JpegDecoder, JpegHeader, batchable_jpeg

PIXELS_NAME = "PIXELS"  # uint8 (3, H, W): the processor's resized image (zeros: see JPEG)
JPEG_NAME = "JPEG"  # the JPEG file when the encoder decodes it, else empty
# int32 (3,): that JPEG's width, height and EXIF orientation, read once in the CPU step (zeros
# without a JPEG), so that the encoder's one process does not parse the header again.
JPEG_HEADER_NAME = "JPEG_HEADER"
# The processor's arguments that stop it before rescaling and normalising: its output stays
# uint8 (a quarter of float32 between the processes), and the encoder finishes it.
UINT8_PIXELS = {"do_rescale": False, "do_normalize": False}


def check_pixels_only(features: Mapping[str, torch.Tensor]) -> None:
    """The stages carry one tensor between them: uint8 pixel_values of (N, 3, H, W)."""
    pixels = features.get("pixel_values")
    if set(features) != {"pixel_values"} or pixels is None or pixels.dtype != torch.uint8:
        raise ValueError(
            f"IEI_TRITON_LAYOUT=split: its image processor returns "
            f"{', '.join(sorted(features))}: the split layout carries pixel_values alone "
            "(IEI_TRITON_LAYOUT=single serves this model)"
        )


class Deferred(NamedTuple):
    """A plain JPEG the encoder decodes on its device: the file and its header."""

    file: bytes
    header: JpegHeader


class PreprocessStage:
    """Files -> uint8 pixels (3, H, W), the file itself for the encoder to decode, or the reason
    an image has neither."""

    def __init__(self, preprocessor: Preprocessor, *, defer_jpegs: bool) -> None:
        self.preprocessor = preprocessor
        self.defer_jpegs = defer_jpegs
        blank = preprocessor.blank(1)
        check_pixels_only(blank)
        self.shape = tuple(blank["pixel_values"].shape[1:])

    def run(self, files: Sequence[bytes]) -> list[np.ndarray | Deferred | InvalidImage]:
        results: list[Any] = [None] * len(files)
        if self.defer_jpegs:
            for i, file in enumerate(files):
                header = batchable_jpeg(file, self.preprocessor.max_image_pixels)
                results[i] = Deferred(file, header) if header else None
        rest = [i for i, r in enumerate(results) if r is None]
        prepared = self.preprocessor.prepare([files[i] for i in rest])
        for i, result in zip(rest, prepared, strict=True):
            results[i] = result if isinstance(result, InvalidImage) else pixels_of(result)
        return results

    def outputs(
        self, results: Sequence[np.ndarray | Deferred]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One request's PIXELS (N, 3, H, W), JPEG (N, 1) and JPEG_HEADER (N, 3) outputs."""
        pixels = np.zeros((len(results), *self.shape), dtype=np.uint8)
        files = np.full((len(results), 1), b"", dtype=np.object_)
        headers = np.zeros((len(results), 3), dtype=np.int32)
        for i, result in enumerate(results):
            if isinstance(result, Deferred):
                files[i, 0] = result.file
                header = result.header
                headers[i] = (header.width, header.height, header.orientation)
            else:
                pixels[i] = result
        return pixels, files, headers


def pixels_of(features: Mapping[str, torch.Tensor]) -> np.ndarray:
    return features["pixel_values"].numpy(force=True)


class EncodeStage:
    """uint8 pixels (and JPEG files) of a dynamic batch -> one vector per image, on the device."""

    def __init__(self, embedder: Embedder, decoder: JpegDecoder | None) -> None:
        self.embedder = embedder
        # Its own processor calls (a JPEG decoded here, or PIL's fallback) stop at uint8 too.
        embedder.processor_options = UINT8_PIXELS
        check_pixels_only(embedder.blank(1))
        self.decoder = decoder
        self.device = embedder.preprocess_device or embedder.device

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> the model's input, exactly as the processor would finish it."""
        p: Any = self.embedder.processor
        return p.rescale_and_normalize(  # type: ignore[no-any-return]
            pixels.to(self.device).float(),
            p.do_rescale, p.rescale_factor, p.do_normalize, p.image_mean, p.image_std,
        )  # fmt: skip

    def embed(
        self, pixels: np.ndarray, files: Sequence[bytes], headers: np.ndarray
    ) -> list[np.ndarray | InvalidImage]:
        """A dynamic batch's PIXELS, JPEG and JPEG_HEADER rows -> a vector or a reason each."""
        batch = torch.from_numpy(np.array(pixels))  # a copy: Triton's input is read-only
        results: list[Any] = [None] * len(files)
        deferred = [i for i, f in enumerate(files) if f]
        if deferred:
            batch = batch.to(self.device)
            decoded = self.decode(
                [files[i] for i in deferred], [JpegHeader(*map(int, headers[i])) for i in deferred]
            )
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

    def decode(self, files: Sequence[bytes], headers: Sequence[JpegHeader]) -> list[Any]:
        """JPEG files -> uint8 (3, H, W) resized on the device, or why not. A file the tensor
        decoder refuses (or that came without one) goes through PIL as in the other layout."""
        results: list[Any] = [None] * len(files)
        if self.decoder is not None:
            budget = self.embedder.budget
            for group in budget_groups(range(len(files)), headers, budget.capacity):
                with budget.hold(sum(headers[i].pixels for i in group)):
                    images = self.decoder.decode(
                        [files[i] for i in group], [headers[i] for i in group]
                    )
                    done = [(i, im) for i, im in zip(group, images, strict=True) if im is not None]
                    if done:
                        resized = self.embedder.process([im for _, im in done])["pixel_values"]
                        for (i, _), image in zip(done, resized, strict=True):
                            results[i] = image
        rest = [i for i, r in enumerate(results) if r is None]
        for i, result in zip(rest, self.embedder.prepare([files[i] for i in rest]), strict=True):
            results[i] = result if isinstance(result, InvalidImage) else result["pixel_values"]
        return results


def budget_groups(
    indices: Sequence[int], headers: Sequence[JpegHeader], capacity: int
) -> list[list[int]]:
    """Consecutive groups of files whose full-size pixels fit the decode budget together (a file
    over the whole budget alone), so that decoding a batch never holds more than the budget."""
    groups: list[list[int]] = []
    held = capacity + 1
    for i in indices:
        pixels = headers[i].pixels
        if held + pixels > capacity:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += pixels
    return groups
