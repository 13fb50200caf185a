"""Decoding, preprocessing and the forward pass of one dynamic batch; no Triton here."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image

from .engines import Choice
from .fused import FusedProcessor, fused_processor
from .images import InvalidImage, PixelBudget, ResizeRule, decode_image
from .pass_plan import Plan, pass_sizes

# The tensors a processor or tokenizer returns, by name: batched (N, ...) for a batch, unbatched
# for one input. Every one goes to the model (SigLIP2 NaFlex: pixel_values, pixel_attention_mask,
# spatial_shapes).
Inputs: TypeAlias = dict[str, torch.Tensor]


def unbatch(batch: Mapping[str, torch.Tensor]) -> list[Inputs]:
    """A batch of tensors -> one dict per input."""
    count = len(next(iter(batch.values())))
    return [{name: tensor[i] for name, tensor in batch.items()} for i in range(count)]


def stack(items: Sequence[Mapping[str, torch.Tensor]]) -> Inputs:
    """One dict per input -> a batch (the inverse of `unbatch`)."""
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Onto the model's device; only floating tensors take the model's dtype (masks, ids and
    shapes keep theirs)."""
    if tensor.is_floating_point():
        return tensor.to(device, dtype=dtype, non_blocking=True)
    return tensor.to(device, non_blocking=True)


@torch.inference_mode()
def run_encoder(
    encoder: Callable[..., torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    forward_batch_size: int,
    plan: Mapping[int, tuple[int, ...]] | None = None,
) -> np.ndarray:
    """(N, ...) tensors -> (N, D) float32, in sub-batches of `forward_batch_size`, each cut
    as `plan` says (pass_plan.py)."""
    count = len(next(iter(batch.values())))
    chunks = []
    start = 0
    for size in pass_sizes(count, forward_batch_size, plan or {}):
        part = {
            name: to_device(tensor[start : start + size], device, dtype)
            for name, tensor in batch.items()
        }
        chunks.append(encoder(**part).float())
        start += size
    return torch.cat(chunks).cpu().numpy()


def is_device_failure(exc: BaseException) -> bool:
    """Out of memory, or an error of the CUDA runtime: a server fault whatever the image."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("CUDA" in str(exc) or "cuda" in str(exc))


class Preprocessor:
    """Decoding and the image processor for one batch of images: encoded files in, the
    processor's tensors out (per image), in a pool of decode threads; no model, no Triton."""

    def __init__(
        self,
        processor: Callable[..., Any],
        *,
        device: torch.device,
        max_image_pixels: int,
        decode_threads: int,
        draft_side: int = 0,
        jpeg_draft: bool = True,
        pixel_budget: int | None = None,
        preprocess_device: torch.device | None = None,
        processor_options: dict[str, Any] | None = None,
        fuse: bool = False,
    ) -> None:
        # IEI_FUSED_PREPROCESS: the processor's steps per image on its uint8 pixels (fused.py),
        # where they agree with the processor's own call; on the CPU only (a GPU instance
        # resizes on the GPU).
        self.fuse = fuse and preprocess_device is None
        self.fused: FusedProcessor | None = None
        self.fused_reason = "off"
        self._processor = processor
        # Passed to every processor call (the split layout's CPU stage: do_normalize=False...)
        self._processor_options = processor_options or {}
        self._check_fused()
        self.device = device
        self.max_image_pixels = max_image_pixels
        self.draft_side = draft_side  # images shrink to no less than this (0: not at all)
        self.jpeg_draft = jpeg_draft
        self.budget = PixelBudget(pixel_budget or max_image_pixels)
        self.preprocess_device = preprocess_device
        self.threads = decode_threads
        self.pool = ThreadPoolExecutor(
            max_workers=decode_threads,
            thread_name_prefix="decode",
            initializer=self._enter_decode_thread,
        )
        self._start_decode_threads()

    def _enter_decode_thread(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # torch's current GPU is per thread
        else:
            # A decode thread's tensor work (the processor's resize) runs on one core: each
            # thread would otherwise start an OpenMP team of its own (threads x cores threads).
            # torch copies its global setting into a thread's own OpenMP setting the first time
            # the thread asks for it: set it, make this thread ask now, and
            # _start_decode_threads puts the global setting back for the forward pass.
            torch.set_num_threads(1)
            torch.get_num_threads()

    def _start_decode_threads(self) -> None:
        """Start every decode thread now (ThreadPoolExecutor starts them on demand), so that
        none changes torch's settings later, then restore the forward pass's threads."""
        compute_threads = torch.get_num_threads()
        ready = threading.Barrier(self.threads + 1)
        for _ in range(self.threads):
            self.pool.submit(ready.wait)
        ready.wait()
        torch.set_num_threads(compute_threads)

    @property
    def processor(self) -> Callable[..., Any]:
        return self._processor

    @processor.setter
    def processor(self, processor: Callable[..., Any]) -> None:
        self._processor = processor
        self._check_fused()

    @property
    def processor_options(self) -> dict[str, Any]:
        return self._processor_options

    @processor_options.setter
    def processor_options(self, options: dict[str, Any]) -> None:
        self._processor_options = options
        self._check_fused()

    def _check_fused(self) -> None:
        """A new processor or new options: whether the fused path stands in for them."""
        # How its resize grows with an image's aspect ratio: checked before any resize.
        self.resize_rule = ResizeRule.of(self.processor, self.processor_options)
        if self.fuse:
            self.fused, self.fused_reason = fused_processor(self.processor, self.processor_options)
        # Where every image comes out one size, a batch's rows are written in place (embed).
        self.fused_shape = self.fused.fixed_shape() if self.fused is not None else None

    def preprocessing_line(self) -> str:
        """How images become model input, for the instance's log line."""
        if self.fused is not None:
            return "the processor's steps fused per image (IEI_FUSED_PREPROCESS)"
        return f"the processor's own call ({self.fused_reason})"

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def decode(self, blob: bytes) -> Image.Image | InvalidImage:
        """One file as `prepare` decodes it (this instance's draft side and pixel budget); a
        failure is returned, not raised."""
        try:
            return decode_image(
                blob, self.max_image_pixels, self.draft_side, self.budget,
                jpeg_draft=self.jpeg_draft, resize_rule=self.resize_rule,
            )  # fmt: skip
        except InvalidImage as exc:
            return exc

    def resized_pixels(self, image: Image.Image) -> int:
        """Pixels of `image` once the processor has resized it (before any crop)."""
        width, height = self.resize_rule.resized(image.width, image.height)
        return width * height

    def preprocess(self, images: list[Image.Image]) -> list[Inputs | InvalidImage]:
        """The model's own processor over the batch (every tensor it returns, per image); per
        image only if the batch fails.

        On a GPU instance the processor resizes and normalises there (its `device` argument):
        the uint8 image goes over, and the float tensor never crosses the bus.
        """
        if not images:
            return []
        try:
            return list(unbatch(self.process(images)))
        except Exception as exc:
            if is_device_failure(exc):
                raise  # the GPU's trouble, not the images': the whole execution fails (5xx)
            results: list[Inputs | InvalidImage] = []
            for image in images:
                try:
                    results.append(unbatch(self.process([image]))[0])
                except Exception as exc:
                    if is_device_failure(exc):
                        raise
                    results.append(InvalidImage(f"preprocessing failed: {exc}"))
            return results

    def process(self, images: list[Any]) -> Inputs:
        """The processor's call on decoded images (PIL images, or (3, H, W) uint8 tensors on the
        device), with this instance's options and device."""
        fusable = self.fused is not None and self.preprocess_device is None
        if fusable and all(isinstance(i, Image.Image) for i in images):
            return self.fused(images)
        options: dict[str, Any] = {"return_tensors": "pt", **self.processor_options}
        if self.preprocess_device is not None:
            options["device"] = self.preprocess_device
        features = self.processor(images=images, **options)
        return {name: value for name, value in features.items() if isinstance(value, torch.Tensor)}

    def blank(self, count: int) -> Inputs:
        """`count` grey images through the same processor call as requests (warm-up, checks)."""
        return self.process([Image.new("RGB", (32, 32), (127, 127, 127))] * count)

    def prepare(self, blobs: Sequence[bytes]) -> list[Inputs | InvalidImage]:
        """Encoded files -> model input, decode and processor together in the thread pool.

        The batch is cut into one contiguous chunk per thread: the processor's per-image work
        (resize, to tensor) then runs in parallel too instead of on one core after the decode.
        """
        chunk = max(1, math.ceil(len(blobs) / self.threads))
        chunks = [blobs[i : i + chunk] for i in range(0, len(blobs), chunk)]
        return [r for part in self.pool.map(self._prepare_chunk, chunks) for r in part]

    def _prepare_chunk(self, blobs: Sequence[bytes]) -> list[Inputs | InvalidImage]:
        results: list[Any] = [self.decode(blob) for blob in blobs]
        good = [i for i, r in enumerate(results) if isinstance(r, Image.Image)]
        # The resized images count against the decode budget too (a panorama's is large).
        with self.budget.hold(sum(self.resized_pixels(results[i]) for i in good)):
            prepared = self.preprocess([results[i] for i in good])
        for i, tensor in zip(good, prepared, strict=True):
            results[i] = tensor
        return results


class Embedder(Preprocessor):
    """Decoding, preprocessing and the forward pass for one batch of images; no Triton here."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        processor: Callable[..., Any],
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_image_pixels: int,
        forward_batch_size: int,
        decode_threads: int,
        draft_side: int = 0,
        jpeg_draft: bool = True,
        pixel_budget: int | None = None,
        preprocess_device: torch.device | None = None,
        model_facts: dict[str, Any] | None = None,
        fuse: bool = False,
    ) -> None:
        self.encoder = encoder  # processor tensors -> (N, D), pooling included (encoders.py)
        self.run: Callable[..., torch.Tensor] = encoder  # or its engine's runner (engines.py)
        self.choice = Choice("torch", str(dtype).removeprefix("torch."))
        self.dtype = dtype
        self.forward_batch_size = forward_batch_size
        # Sizes of pass better run as several smaller ones on this CPU (loading.py measures it)
        # and the plan in words, for the instance's log line.
        self.pass_plan: Plan = {}
        self.pass_note = ""
        # CPU threads of a pass (0 on a GPU) and, where measured at load, why that many.
        self.forward_threads = 0
        self.thread_note = ""
        self.model_facts = model_facts or {}  # the model's configuration, as a dict
        # A dual encoder's zero_shot, logit_scale and logit_bias (loading.zero_shot_facts).
        self.zero_shot: dict[str, Any] = {}
        super().__init__(
            processor,
            device=device,
            max_image_pixels=max_image_pixels,
            decode_threads=decode_threads,
            draft_side=draft_side,
            jpeg_draft=jpeg_draft,
            pixel_budget=pixel_budget,
            preprocess_device=preprocess_device,
            fuse=fuse,
        )

    def forward(self, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The processor's tensors, (N, ...) each -> (N, D) float32, in sub-batches of
        `forward_batch_size` (cut as `pass_plan` says)."""
        return run_encoder(
            self.run, batch, device=self.device, dtype=self.dtype,
            forward_batch_size=self.forward_batch_size, plan=self.pass_plan,
        )  # fmt: skip

    def embed(self, blobs: Sequence[bytes]) -> list[np.ndarray | InvalidImage]:
        """Every image of a whole dynamic batch -> its vector, or the reason it has none."""
        if self.fused_shape is not None and self.fused is not None:
            return self._embed_in_place(blobs, self.fused, self.fused_shape)
        results: list[Any] = self.prepare(blobs)
        ready = [(i, t) for i, t in enumerate(results) if isinstance(t, dict)]
        if ready:
            vectors = self.forward(stack([t for _, t in ready]))
            for (i, _), vector in zip(ready, vectors, strict=True):
                results[i] = vector
        return results

    def _embed_in_place(
        self, blobs: Sequence[bytes], fused: FusedProcessor, shape: tuple[int, ...]
    ) -> list[np.ndarray | InvalidImage]:
        """`embed` where the fused path gives every image one shape: each decode thread writes
        its images' rows of one batch, already in the forward pass's dtype. No per-image tensors
        stacked afterwards and no cast of the whole batch: two copies of every image fewer."""
        dtype = self.dtype if fused.dtype.is_floating_point else fused.dtype
        batch = torch.empty((len(blobs), *shape), dtype=dtype)

        def write_chunk(start: int) -> list[InvalidImage | None]:
            failures: list[InvalidImage | None] = []
            for i in range(start, min(start + chunk, len(blobs))):
                image = self.decode(blobs[i])
                if isinstance(image, Image.Image):
                    try:
                        with self.budget.hold(self.resized_pixels(image)):
                            fused.write(fused.resized(image), batch[i])
                        image = None
                    except Exception as exc:
                        image = InvalidImage(f"preprocessing failed: {exc}")
                failures.append(image)
            return failures

        chunk = max(1, math.ceil(len(blobs) / self.threads))
        starts = range(0, len(blobs), chunk)
        results: list[Any] = [r for part in self.pool.map(write_chunk, starts) for r in part]
        good = [i for i, r in enumerate(results) if r is None]
        if good:
            rows = batch if len(good) == len(blobs) else batch[good]
            for i, vector in zip(good, self.forward({"pixel_values": rows}), strict=True):
                results[i] = vector
        return results
