"""IEI_FUSED_PREPROCESS (fused.py): the processor's steps per image on its uint8 pixels give what
each family's published processor gives, and a processor it cannot stand in for keeps its call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_pb_utils import load_model_module
from PIL import Image
from sample_images import photos
from tiny_models import FAMILIES, PREPROCESSORS

load_model_module()  # installs the stand-in for Triton's utils first

from iei_runtime import fused  # noqa: E402
from iei_runtime.embedder import Preprocessor  # noqa: E402
from iei_runtime.images import decode_image  # noqa: E402
from iei_runtime.stages import UINT8_PIXELS  # noqa: E402

PROCESSORS = {name: config for name, (_, config) in FAMILIES.items()} | PREPROCESSORS
# The processors the fused path stands in for; SigLIP2 (NaFlex patches) keeps its own call.
FUSED = sorted(set(PROCESSORS) - {"siglip2_naflex"})


def processor(family: str, folder: Path):
    from transformers import AutoImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSORS[family]))
    return AutoImageProcessor.from_pretrained(folder)


def decoded_photos(min_side: int) -> list[Image.Image]:
    """The sample photos as the service decodes them (drafted), in several sizes and aspects."""
    images = [decode_image(blob, 10**9, min_side) for blob in photos().values()]
    return [*images, images[0].resize((1200, 300)), images[1].resize((90, 140))]


@pytest.mark.parametrize("family", FUSED)
@pytest.mark.parametrize("options", [{}, UINT8_PIXELS], ids=["normalised", "uint8"])
def test_the_fused_path_gives_what_the_processor_gives(family, options, tmp_path):
    reference = processor(family, tmp_path)
    path, reason = fused.fused_processor(reference, options)
    assert path is not None, reason
    images = decoded_photos(448)
    mine = path(images)["pixel_values"]
    theirs = reference(images=images, return_tensors="pt", **options)["pixel_values"]
    assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
    # One pixel level is worth path.level in the output: the two resize the same uint8 pixels.
    levels = (mine.float() - theirs.float()).abs() / path.level
    # The same resize of the same pixels: equal but for float rounding in the normalisation.
    assert levels.max().item() < 0.01
    if not options:
        cosine = torch.nn.functional.cosine_similarity(
            mine.flatten(1).double(), theirs.flatten(1).double()
        )
        assert cosine.min().item() > 0.999999


def test_a_processor_with_steps_of_its_own_keeps_its_call(tmp_path):
    path, reason = fused.fused_processor(processor("siglip2_naflex", tmp_path), {})
    assert path is None and "steps of its own" in reason


def test_a_processor_that_disagrees_on_the_probes_keeps_its_call(tmp_path, monkeypatch):
    reference = processor("vit", tmp_path)
    # A resize that is off by a few pixel levels: the start-up comparison must catch it.
    original = fused.FusedProcessor.resized
    monkeypatch.setattr(
        fused.FusedProcessor,
        "resized",
        lambda self, image: (original(self, image).int() + 5).clamp(0, 255).to(torch.uint8),
    )
    path, reason = fused.fused_processor(reference, {})
    assert path is None and "pixel levels apart" in reason


def test_a_processor_that_pads_keeps_its_call(tmp_path):
    reference = processor("vit", tmp_path)
    path, reason = fused.fused_processor(reference, {"do_pad": True})
    assert path is None and "pads" in reason


def preprocessor(reference, *, fuse: bool, **options) -> Preprocessor:
    return Preprocessor(
        reference, device=torch.device("cpu"), max_image_pixels=10**9, decode_threads=2,
        fuse=fuse, **options,
    )  # fmt: skip


def test_the_setting_chooses_the_path_and_the_log_line_says_which(tmp_path):
    reference = processor("clip", tmp_path)
    on, off = preprocessor(reference, fuse=True), preprocessor(reference, fuse=False)
    try:
        assert on.fused is not None and "fused" in on.preprocessing_line()
        assert off.fused is None and "own call (off)" in off.preprocessing_line()
        blobs = list(photos().values())
        fused_rows = np.stack([r["pixel_values"].numpy() for r in on.prepare(blobs)])
        own_rows = np.stack([r["pixel_values"].numpy() for r in off.prepare(blobs)])
        assert np.abs(fused_rows - own_rows).max() <= fused.MAX_LEVELS * on.fused.level
    finally:
        on.close()
        off.close()


def test_new_processor_options_are_checked_again(tmp_path):
    """The split layout's encoder switches its processor to uint8 after construction."""
    stage = preprocessor(processor("dinov2", tmp_path), fuse=True)
    try:
        assert stage.fused is not None and stage.fused.dtype == torch.float32
        stage.processor_options = UINT8_PIXELS
        assert stage.fused is not None and stage.fused.dtype == torch.uint8
        assert stage.blank(2)["pixel_values"].dtype == torch.uint8
    finally:
        stage.close()


def test_a_gpu_instance_never_fuses(tmp_path):
    """On a GPU the processor resizes there (its device argument): the CPU path is not used."""
    reference = processor("vit", tmp_path)
    stage = Preprocessor(
        reference, device=torch.device("cpu"), max_image_pixels=10**9, decode_threads=1,
        preprocess_device=torch.device("cuda", 0), fuse=True,
    )  # fmt: skip
    try:
        assert stage.fused is None
    finally:
        stage.close()


@pytest.mark.parametrize("family", ["vit", "convnext", "clip"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batch_written_in_place_gives_the_per_image_paths_vectors(model_dirs, family, dtype):
    """Embedder.embed writes each image's row of one batch in the model's dtype where the fused
    path gives one shape: the vectors are those of per-image tensors stacked and cast, bit for
    bit, and a file that fails keeps its place."""
    from iei_runtime import loading
    from iei_runtime.settings import read_settings

    environ = {"IMAGE_EMBEDDING_MODEL": str(model_dirs[family]), "IEI_DTYPE": dtype,
               "IEI_ENGINE": "torch"}  # fmt: skip
    embedder = loading.load_embedder(read_settings({}, environ), torch.device("cpu"), 2)
    try:
        assert embedder.fused_shape == tuple(embedder.blank(1)["pixel_values"].shape[1:])
        blobs = list(photos().values())
        blobs.insert(1, b"not an image")
        in_place = embedder.embed(blobs)
        embedder.fused_shape = None  # the per-image path: tensors stacked, then cast
        per_image = embedder.embed(blobs)
    finally:
        embedder.close()
    assert (
        str(in_place[1])
        == str(per_image[1])
        == ("cannot decode image: not a format the server reads")
    )
    del in_place[1], per_image[1]
    for mine, theirs in zip(in_place, per_image, strict=True):
        assert np.array_equal(mine, theirs)


def test_only_a_processor_of_one_output_size_writes_batches_in_place(tmp_path):
    """A centre crop gives every image one shape (rows written in place); a shortest edge
    without a crop keeps each image's aspect, so each image keeps its own tensor."""
    cropped = processor("dinov2", tmp_path / "cropped")
    assert fused.FusedProcessor(cropped, {}).fixed_shape() == (3, 224, 224)
    options = {"do_center_crop": False}
    assert fused.FusedProcessor(cropped, options).fixed_shape() is None
