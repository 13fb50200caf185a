"""JPEG files decoded in batches into tensors on the encoder's device (IEI_JPEG_DECODER): NVIDIA
nvImageCodec or torchvision's nvJPEG on a GPU, torchvision's libjpeg-turbo on a CPU. Only plain
JPEGs go there (`batchable_jpeg`); every other file, and every file such a decoder refuses, is
decoded by PIL (images.py), whose errors are the ones clients see."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from .images import MAX_JPEG_SCANS, InvalidImage, progressive_scans

JPEG_DECODERS = ("auto", "pil", "torchvision", "nvimagecodec")
_EOI = b"\xff\xd9"  # JPEG's end-of-image marker: a truncated file lacks it


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    orientation: int  # EXIF orientation, 1 = upright

    @property
    def pixels(self) -> int:
        return self.width * self.height


def batchable_jpeg(data: bytes, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG that a tensor decoder may take (one frame, 8-bit RGB or grey,
    complete, within the pixel limit and the scan limit), read without decoding; None sends the
    file to PIL (which refuses one of too many scans)."""
    if not data.startswith(b"\xff\xd8") or _EOI not in data[-64:]:
        return None
    try:
        if progressive_scans(data) > MAX_JPEG_SCANS:
            return None
    except InvalidImage:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            # MPO (several frames) and CMYK/YCCK (Adobe's inverted inks) stay with PIL.
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if not 0 < image.width * image.height <= max_pixels:
                return None
            orientation = image.getexif().get(0x0112, 1)
            upright = orientation if orientation in UPRIGHT else 1
            return JpegHeader(image.width, image.height, upright)
    except Exception:  # anything PIL cannot read, PIL will say why when it decodes it
        return None


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


# EXIF orientation -> the operation on a (C, H, W) tensor that makes it upright, as
# images.UPRIGHT does on a PIL image.
UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1, -2),
    4: lambda x: x.flip(-2),
    5: _transpose,
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),
    7: lambda x: _transpose(x).flip(-1, -2),
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),
}


class JpegDecoder(Protocol):
    name: str

    def decode(self, files: Sequence[bytes], headers: Sequence[JpegHeader]) -> list[Any]:
        """Upright (3, H, W) uint8 tensors on the device, None where a file was refused."""


class TorchvisionDecoder:
    """torchvision's `decode_jpeg`: a list in one call (nvJPEG's batched decoder on a GPU,
    libjpeg-turbo on a CPU). It fails a whole call for one bad file: the files are then decoded
    one by one. EXIF orientation is applied here (the GPU path ignores it)."""

    name = "torchvision"

    def __init__(self, device: torch.device) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device = device
        self._decode, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.last_error: str | None = None  # why the last refused file was refused

    def _call(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # deprecated in 0.29 for TorchCodec, whose wheel is
            warnings.simplefilter("ignore", DeprecationWarning)  # CUDA 13 only (docs/gpu.md)
            images = self._decode(data, mode=self._rgb, device=self.device)
        return list(images)

    def decode(self, files: Sequence[bytes], headers: Sequence[JpegHeader]) -> list[Any]:
        data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
        try:
            images: list[Any] = self._call(data)
        except RuntimeError:
            images = []
            for one in data:
                try:
                    images += self._call([one])
                except RuntimeError as exc:
                    self.last_error = first_line(exc)
                    images.append(None)
        return [
            None if image is None else UPRIGHT[header.orientation](image)
            for image, header in zip(images, headers, strict=True)
        ]


class NvImageCodecDecoder:
    """NVIDIA nvImageCodec (`nvidia-nvimgcodec-cu12/-cu13`): a list in one call on the GPU's
    hardware JPEG engine where it has one, its CUDA decoder otherwise; EXIF orientation applied;
    None for each file it cannot decode, the others still decoded."""

    name = "nvimagecodec"

    def __init__(self, device: torch.device) -> None:
        from nvidia import nvimgcodec

        kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY)
        self.decoder = nvimgcodec.Decoder(
            device_id=device.index or 0,
            max_num_cpu_threads=1,  # 0 would be every core: the preprocessing instances' cores
            backends=[nvimgcodec.Backend(kind) for kind in kinds],  # no CPU: PIL does that
        )
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=True)

    def decode(self, files: Sequence[bytes], headers: Sequence[JpegHeader]) -> list[Any]:
        images = self.decoder.decode(list(files), params=self.params)
        # (H, W, 3) interleaved RGB on the GPU, shared through DLPack (no copy).
        return [None if im is None else torch.from_dlpack(im).permute(2, 0, 1) for im in images]


def choose_jpeg_decoder(requested: str, device: torch.device) -> JpegDecoder | None:
    """The decoder for IEI_JPEG_DECODER on this device, or None for PIL alone. `auto`: on a GPU
    nvImageCodec where it is installed, else torchvision's nvJPEG; on a CPU PIL (whose draft
    decoding of large JPEGs measured faster than a full decode).

    A decoder that is there but cannot decode (nvImageCodec without libnvjpeg returns None for
    every file) is refused here, by a warm-up decode, in one line naming it and its error: never
    a silent fallback of every image to PIL in the encoders' processes."""
    if requested == "pil" or (requested == "auto" and device.type != "cuda"):
        return None
    decoder: JpegDecoder | None = None
    if requested in ("auto", "nvimagecodec"):
        if device.type != "cuda":
            raise ValueError("IEI_JPEG_DECODER=nvimagecodec decodes on a GPU; there is none here")
        try:
            decoder = NvImageCodecDecoder(device)
        except ImportError:
            if requested == "nvimagecodec":
                raise ValueError(
                    "IEI_JPEG_DECODER=nvimagecodec: nvImageCodec is not installed (pip install "
                    "'iei[gpu]' on CUDA 13 drivers, 'iei[serve-cu12]' on CUDA 12 ones)"
                ) from None
        except Exception as exc:  # installed, but it cannot start on this GPU
            raise ValueError(
                f"IEI_JPEG_DECODER={requested}: nvimagecodec cannot start: {first_line(exc)} "
                "(IEI_JPEG_DECODER=torchvision or pil serve without it)"
            ) from None
    decoder = decoder or TorchvisionDecoder(device)
    warm_up(decoder, requested)
    return decoder


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def warm_up(decoder: JpegDecoder, requested: str) -> None:
    """Decode one small JPEG (made here) with `decoder`, or raise the one line why it cannot."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buffer, "JPEG", quality=90)
    try:
        [image] = decoder.decode([buffer.getvalue()], [JpegHeader(64, 48, 1)])
        refused = getattr(decoder, "last_error", None) or "it refused a plain JPEG"
        error = refused if image is None else None
        if image is not None and tuple(image.shape) != (3, 48, 64):
            error = f"it returned shape {tuple(image.shape)} for a 64x48 JPEG"
    except Exception as exc:
        error = first_line(exc)
    if error is not None:
        raise ValueError(
            f"IEI_JPEG_DECODER={requested}: {decoder.name}'s warm-up decode failed: {error} "
            "(IEI_JPEG_DECODER=pil decodes on the CPU instead)"
        )
