"""The split layout's two stages (IEI_TRITON_LAYOUT=split; `iei` is then an ensemble of them).

`iei_preprocess` runs on many single-threaded CPU instances (processes: no GIL shared) and turns
files into the processor's resized image, uint8, not yet normalised; `iei_encoder` runs on the
model's device with its own dynamic batcher, normalises there and runs the encoder, so the decoding
of the next batch overlaps this batch's forward pass. A JPEG that a tensor decoder may take crosses
as the file itself and is decoded, resized and normalised on the encoder's device
(jpeg_decoders.py). No Triton here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .embedder import Embedder, Preprocessor
from .images import MAX_JPEG_SCANS, InvalidImage, jpeg_frame
from .jpeg_decoders import UPRIGHT, JpegDecoder, JpegHeader, batchable_jpeg

# uint8 (3, H, W): the processor's resized image; a row whose JPEG is set is not read. A request
# whose every image crosses as a JPEG carries (3, 1, 1) placeholders (3 bytes, not 150 KB of
# zeros): iei_encoder's PIXELS is a ragged input, so such requests still batch with the others.
PIXELS_NAME = "PIXELS"
JPEG_NAME = "JPEG"  # the JPEG file when the encoder decodes it, else empty
# int32 (3,): that JPEG's width, height and EXIF orientation, read once in the CPU step (zeros
# without a JPEG), so that the encoders' processes do not parse the header again.
JPEG_HEADER_NAME = "JPEG_HEADER"
# The processor's arguments that stop it before rescaling and normalising: its output stays
# uint8 (a quarter of float32 between the processes), and the encoder finishes it.
UINT8_PIXELS = {"do_rescale": False, "do_normalize": False}
# Why an image went to PIL although a tensor decoder is configured (IEI_JPEG_DECODER): counted in
# Triton's metrics as iei_pil_fallback_total{reason=...} (triton.py).
OTHER_FORMAT = "other_format"  # PNG, WebP, GIF, BMP, TIFF
UNSUPPORTED_JPEG = "unsupported_jpeg"  # CMYK, several frames, truncated, over the pixel limit
DECODER_REFUSED = "decoder_refused"  # a plain JPEG the tensor decoder could not decode
FALLBACK_REASONS = (OTHER_FORMAT, UNSUPPORTED_JPEG, DECODER_REFUSED)
CountFallback = Callable[[str, int], None]


def no_count(reason: str, count: int) -> None:
    """The default fallback counter: nothing is counted (outside Triton)."""


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

    def __init__(
        self,
        preprocessor: Preprocessor,
        *,
        defer_jpegs: bool,
        count_fallback: CountFallback = no_count,
    ) -> None:
        self.preprocessor = preprocessor
        self.defer_jpegs = defer_jpegs
        self.count_fallback = count_fallback
        blank = preprocessor.blank(1)
        check_pixels_only(blank)
        self.shape = tuple(blank["pixel_values"].shape[1:])

    def run(self, files: Sequence[bytes]) -> list[np.ndarray | Deferred | InvalidImage]:
        results: list[Any] = [None] * len(files)
        if self.defer_jpegs:
            others = 0
            limit = self.preprocessor.max_image_pixels
            for i, file in enumerate(files):
                header = batchable_jpeg(file, limit)
                results[i] = Deferred(file, header) if header else None
                others += header is None and not file.startswith(b"\xff\xd8")
                if header:  # refused here, as PIL's path would: never resized on the device
                    try:
                        self.preprocessor.resize_rule.check(header.width, header.height, limit)
                    except InvalidImage as exc:
                        results[i] = exc
            # Decoded by PIL here although the encoder has a tensor decoder: counted.
            jpegs = results.count(None) - others
            for reason, count in ((OTHER_FORMAT, others), (UNSUPPORTED_JPEG, jpegs)):
                if count:
                    self.count_fallback(reason, count)
        rest = [i for i, r in enumerate(results) if r is None]
        prepared = self.preprocessor.prepare([files[i] for i in rest])
        for i, result in zip(rest, prepared, strict=True):
            results[i] = result if isinstance(result, InvalidImage) else pixels_of(result)
        return results

    def outputs(
        self, results: Sequence[np.ndarray | Deferred]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One request's PIXELS (N, 3, H, W), JPEG (N, 1) and JPEG_HEADER (N, 3) outputs. Rows
        of PIXELS whose JPEG is set are never read by the encoder: zero (only they are set
        twice; left uninitialised they carried other requests' pixels to a caller of this
        model), and all (3, 1, 1) when every image of the request crosses as a file."""
        count = len(results)
        files = np.full((count, 1), b"", dtype=np.object_)
        headers = np.zeros((count, 3), dtype=np.int32)
        deferred = [(i, r) for i, r in enumerate(results) if isinstance(r, Deferred)]
        if not deferred:
            return np.stack(results), files, headers  # type: ignore[arg-type]
        for i, result in deferred:
            files[i, 0] = result.file
            headers[i] = (result.header.width, result.header.height, result.header.orientation)
        if len(deferred) == count:
            return np.zeros((count, 3, 1, 1), dtype=np.uint8), files, headers
        pixels = np.empty((count, *self.shape), dtype=np.uint8)
        for i, result in enumerate(results):
            pixels[i] = 0 if isinstance(result, Deferred) else result
        return pixels, files, headers


def pixels_of(features: Mapping[str, torch.Tensor]) -> np.ndarray:
    return features["pixel_values"].numpy(force=True)


class EncodeStage:
    """uint8 pixels (and JPEG files) of a dynamic batch -> one vector per image, on the device.

    The hot path of a GPU host (one process feeds the GPU): each execution copies the rows it
    uses once, into a pinned staging buffer uploaded without blocking; JPEGs are decoded,
    resized and normalised on the device; nothing else is copied."""

    def __init__(
        self,
        embedder: Embedder,
        decoder: JpegDecoder | None,
        *,
        count_fallback: CountFallback = no_count,
    ) -> None:
        self.embedder = embedder
        # Its own processor calls (a JPEG decoded here, or PIL's fallback) stop at uint8 too.
        embedder.processor_options = UINT8_PIXELS
        blank = embedder.blank(1)
        check_pixels_only(blank)
        self.shape = tuple(blank["pixel_values"].shape[1:])  # (3, H, W) of every PIXELS row
        self.decoder = decoder
        self.count_fallback = count_fallback
        self.device = embedder.preprocess_device or embedder.device
        self._staging: torch.Tensor | None = None

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> the model's input, exactly as the processor would finish it."""
        p: Any = self.embedder.processor
        return p.rescale_and_normalize(  # type: ignore[no-any-return]
            pixels.to(self.device).float(),
            p.do_rescale, p.rescale_factor, p.do_normalize, p.image_mean, p.image_std,
        )  # fmt: skip

    def staging(self, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused host buffer for `count` rows of `shape`: pinned when the device is a GPU, so
        that its upload is a DMA that does not block (the execution's result is read back
        before the next execution writes here again)."""
        held = self._staging
        if held is None or len(held) < count or tuple(held.shape[1:]) != shape:
            rows = max(count, len(held) if held is not None else 0, 64)
            pin = self.device.type == "cuda"
            held = self._staging = torch.empty((rows, *shape), dtype=torch.uint8, pin_memory=pin)
        return held[:count]

    def gather(self, pixels: Sequence[np.ndarray], rows: Sequence[bool]) -> torch.Tensor:
        """The rows of the requests' PIXELS arrays (in order) where `rows` is true, copied once
        into the staging buffer, on the device."""
        masks, start = [], 0
        for array in pixels:
            masks.append(rows[start : start + len(array)])
            start += len(array)
        shape = next(tuple(a.shape[1:]) for a, m in zip(pixels, masks, strict=True) if any(m))
        buffer = self.staging(sum(rows), shape)
        out = buffer.numpy()
        filled = 0
        for array, mine in zip(pixels, masks, strict=True):
            if all(mine):
                out[filled : filled + len(array)] = array
                filled += len(array)
            elif any(mine):
                chosen = [k for k, own in enumerate(mine) if own]
                np.take(array, chosen, axis=0, out=out[filled : filled + len(chosen)])
                filled += len(chosen)
        if self.device.type == "cuda":
            return buffer.to(self.device, non_blocking=True)
        return buffer

    def request_error(self, pixels: Any, files: Sequence[bytes], headers: Any) -> str | None:
        """Why one request's PIXELS and JPEG_HEADER cannot go with its JPEG rows (a client of
        Triton may send this step anything), or None: a row per image each, PIXELS uint8 of the
        processor's output shape, or (3, 1, 1) placeholders where every image is a file."""
        count = len(files)
        if getattr(headers, "shape", None) != (count, 3):
            shape = getattr(headers, "shape", None)
            return f"{JPEG_HEADER_NAME} of shape {shape}: expected ({count}, 3), a row per image"
        shape = tuple(getattr(pixels, "shape", ()))
        placeholder = shape[1:] == (3, 1, 1) and all(files)
        if (
            getattr(pixels, "dtype", None) != np.uint8
            or len(shape) != 4
            or shape[0] != count
            or (shape[1:] != self.shape and not placeholder)
        ):
            expected = ", ".join(map(str, (count, *self.shape)))
            return (
                f"{PIXELS_NAME} of shape {shape} ({getattr(pixels, 'dtype', None)}): expected "
                f"uint8 ({expected}), the processor's output, or ({count}, 3, 1, 1) where every "
                f"image comes as a {JPEG_NAME} file"
            )
        return None

    def embed_requests(
        self,
        pixels: Sequence[np.ndarray],
        files: Sequence[bytes],
        headers: Sequence[np.ndarray],
        spans: Sequence[range],
    ) -> list[np.ndarray | InvalidImage]:
        """`embed` over a dynamic batch's requests (PIXELS and JPEG_HEADER one array each, JPEG
        rows in `spans`): a request whose tensors do not fit together fails alone."""
        results: list[Any] = [None] * len(files)
        good: list[int] = []
        for r, span in enumerate(spans):
            error = self.request_error(pixels[r], files[span.start : span.stop], headers[r])
            if error is None:
                good.append(r)
            else:
                for i in span:
                    results[i] = InvalidImage(error)
        rows = [i for r in good for i in spans[r]]
        if rows:
            done = self.embed(
                [pixels[r] for r in good],
                [files[i] for i in rows],
                np.concatenate([headers[r] for r in good]),
            )
            for i, result in zip(rows, done, strict=True):
                results[i] = result
        return results

    def embed(
        self, pixels: Sequence[np.ndarray], files: Sequence[bytes], headers: np.ndarray
    ) -> list[np.ndarray | InvalidImage]:
        """A dynamic batch's PIXELS (one array per request, rows in order), JPEG and
        JPEG_HEADER rows -> a vector or a reason each. A row with a JPEG is decoded here; the
        others' pixels are used as they came."""
        results: list[Any] = [None] * len(files)
        own = [not f for f in files]
        parts, order = [], []
        if any(own):
            parts.append(self.gather(pixels, own))
            order += [i for i, o in enumerate(own) if o]
        deferred = [i for i, o in enumerate(own) if not o]
        if deferred:
            rows = headers.tolist()  # one conversion, not one per image
            decoded = self.decode(
                [files[i] for i in deferred], [JpegHeader(*rows[i]) for i in deferred]
            )
            good = []
            for i, image in zip(deferred, decoded, strict=True):
                if isinstance(image, InvalidImage):
                    results[i] = image
                else:
                    good.append(image)
                    order.append(i)
            if good:
                parts.append(torch.stack(good))
        if order:
            batch = torch.cat(parts) if len(parts) > 1 else parts[0]
            vectors = self.embedder.forward({"pixel_values": self.normalise(batch)})
            for i, vector in zip(order, vectors, strict=True):
                results[i] = vector
        return results

    def confirmed(self, file: bytes, header: JpegHeader) -> bool:
        """Whether a JPEG's own markers confirm its JPEG_HEADER row (its frame's width and
        height, an EXIF orientation of 1 to 8) and it is within the scan and pixel limits, read
        without decoding (images.jpeg_frame)."""
        if header.orientation not in UPRIGHT:
            return False
        try:
            width, height, scans = jpeg_frame(file)
        except InvalidImage:  # too many segments: PIL says so
            return False
        return (
            scans <= MAX_JPEG_SCANS
            and (width, height) == (header.width, header.height)
            and 0 < width * height <= self.embedder.max_image_pixels
        )

    def decode(self, files: Sequence[bytes], headers: Sequence[JpegHeader]) -> list[Any]:
        """JPEG files -> uint8 (3, H, W) resized on the device, or why not. A file the tensor
        decoder refuses (or that came without one) goes through PIL as in the other layout, and
        is counted (DECODER_REFUSED).

        The headers came from this layout's CPU step, or from any client of Triton: a file whose
        header its own markers do not confirm (its size, an orientation of 1 to 8, the scan
        limit, the pixel limit) goes through PIL too, which refuses what it must."""
        results: list[Any] = [None] * len(files)
        unconfirmed = 0
        if self.decoder is not None:
            embedder = self.embedder
            confirmed = []
            for i, (file, header) in enumerate(zip(files, headers, strict=True)):
                if not self.confirmed(file, header):
                    unconfirmed += 1
                    continue
                try:  # before anything is decoded or resized (images.ResizeRule)
                    embedder.resize_rule.check(
                        header.width, header.height, embedder.max_image_pixels
                    )
                    confirmed.append(i)
                except InvalidImage as exc:
                    results[i] = exc
            budget = embedder.budget
            for group in budget_groups(confirmed, headers, budget.capacity):
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
        if unconfirmed:
            self.count_fallback(UNSUPPORTED_JPEG, unconfirmed)
        if len(rest) > unconfirmed and self.decoder is not None:
            self.count_fallback(DECODER_REFUSED, len(rest) - unconfirmed)
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
