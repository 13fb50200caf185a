"""Triton Python model `iei`: encoded image files in, embedding vectors out.

Triton loads the model repository alone (in its own container under compose), so nothing here
imports the frontend. The logic lives in `iei_runtime/` beside this model's folder, shared by
the repository's models and unit-tested without Triton; this class only wires it to Triton.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import triton_python_backend_utils as pb_utils
from PIL import Image

# Triton puts only this model's own folders on sys.path; the shared code is at the repository's
# top (Triton loads the models it is told to, so that folder is no model of its own).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from iei_runtime.loading import describe, load_embedder
from iei_runtime.resources import available_cores
from iei_runtime.settings import read_settings
from iei_runtime.triton import INFO_OUTPUT_NAME, INPUT_NAME, instance_count, make_response


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        settings = read_settings(model_config, dict(os.environ))
        cores = available_cores()
        if args["model_instance_kind"] == "GPU":
            device = torch.device("cuda", int(args["model_instance_device_id"]))
            torch.cuda.set_device(device)
            threads = cores
        else:
            device = torch.device("cpu")
            # instances x threads <= cores, so instances don't fight over the same cores.
            threads = max(1, cores // instance_count(model_config))
            torch.set_num_threads(threads)
        self.logger = pb_utils.Logger
        self.embedder = load_embedder(settings, device, threads)
        self.info = describe(self.embedder, settings)
        # Warm up: the first forward pass allocates and picks kernels.
        self.embedder.forward(self._blank_batch(1))
        self.logger.log_info(
            f"iei: {settings.model_id} on {device} ({self.embedder.dtype}), "
            f"pooling={settings.pooling}, {threads} threads, "
            f"images shrunk to >= {self.embedder.draft_side} px after decoding (0: not), "
            f"JPEG draft decoding {'on' if self.embedder.jpeg_draft else 'off'}, "
            f"{self.embedder.budget.capacity} pixels decoded at once at most"
        )

    def _blank_batch(self, n: int) -> torch.Tensor:
        """n grey images through the same processor call as requests (on the GPU there)."""
        image = Image.new("RGB", (32, 32), (127, 127, 127))
        return self.embedder._process([image] * n)

    def execute(self, requests: list[Any]) -> list[Any]:
        blobs, counts = [], []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            flat = [bytes(b) for b in images.reshape(-1)]
            blobs.extend(flat)
            counts.append(len(flat))
        results = self.embedder.embed(blobs)
        responses = []
        offset = 0
        for request, count in zip(requests, counts, strict=True):
            own = results[offset : offset + count]
            offset += count
            wants_info = INFO_OUTPUT_NAME in request.requested_output_names()
            responses.append(make_response(own, self.info if wants_info else None))
        return responses

    def finalize(self) -> None:
        self.embedder.close()
