"""Triton Python model `iei_preprocess`, the split layout's first step (iei/configs/split.pbtxt):
encoded image files in, uint8 pixels (or the JPEG file, for the encoder's device) out. The logic
is `iei_runtime/stages.py`; this class wires it to Triton."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # iei_runtime/ (see iei/1/model.py)

from iei_runtime.executions import ExecutionClock, clocked
from iei_runtime.loading import load_preprocess_stage
from iei_runtime.stages import JPEG_HEADER_NAME, JPEG_NAME, PIXELS_NAME
from iei_runtime.triton import (
    INPUT_NAME,
    FallbackCounter,
    error_response,
    gather_inputs,
    show_restarts,
    start_instance,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.clock = ExecutionClock().shown(args)
        self.restarts = show_restarts(args, dict(os.environ))
        settings, _, threads = start_instance(args)
        self.stage = load_preprocess_stage(settings, threads, FallbackCounter("iei_preprocess"))
        pb_utils.Logger.log_info(
            f"iei_preprocess: {settings.model_id}'s processor, {threads} thread(s), pixels "
            f"{self.stage.shape} uint8, plain JPEGs "
            f"{'to the encoder' if self.stage.defer_jpegs else 'decoded here'}, preprocessing by "
            f"{self.stage.preprocessor.preprocessing_line()}"
        )

    @clocked  # the launcher's hang check, /health's long executions (iei_runtime/executions.py)
    def execute(self, requests: list[Any]) -> list[Any]:
        files, spans = gather_inputs(requests, INPUT_NAME)
        results = self.stage.run(files)
        responses = []
        for span in spans:
            own = results[span.start : span.stop]
            failed = error_response(own)
            if failed is not None:
                responses.append(failed)
                continue
            outputs = zip(
                (PIXELS_NAME, JPEG_NAME, JPEG_HEADER_NAME),
                self.stage.outputs(own),  # type: ignore[arg-type]
                strict=True,
            )
            tensors = [pb_utils.Tensor(name, rows) for name, rows in outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.clock.close()
        self.stage.preprocessor.close()
