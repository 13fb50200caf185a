"""Fault-test model: `sleep:<seconds>` answers late, `spin:<seconds>` computes that long before
it answers (a long execution, as of 64 huge photos), `fail` fails every request, `sticky`
fails every request, the health probe's included, once it has seen the image b"BREAK" (as a GPU
whose CUDA context is lost does, until the process is restarted).

The frontend's health probe (a 1x1 PNG of under 100 bytes) is answered at once, so the service
becomes healthy and real requests meet the fault.
"""

import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils

# The real models' execution clock (the launcher's hang check), from the shipped repository.
sys.path.insert(0, os.environ["IEI_TEST_RUNTIME"])
from iei_runtime.executions import ExecutionClock, clocked

INFO = json.dumps({"model_id": "fault-model", "model_type": "test", "pooling": "mean"})


class TritonPythonModel:
    def initialize(self, args):
        self.clock = ExecutionClock().shown(args)
        self.behaviour = os.environ.get("IEI_TEST_BEHAVIOUR", "")
        self.broken = False

    @clocked
    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy() for r in requests]
        blobs = [bytes(b) for batch in images for b in batch.reshape(-1)]
        if self.behaviour == "sticky" and any(b"BREAK" in blob for blob in blobs):
            self.broken = True
        if self.broken:
            # One error object per response: a shared one made Triton 2.51's Python backend
            # send garbage as the messages and then segfault (tests/fake_pb_utils.py checks it).
            message = "CUDA error: an illegal memory access was encountered"
            return [
                pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests
            ]
        probe_only = all(len(bytes(b)) < 100 for batch in images for b in batch.reshape(-1))
        if self.behaviour.startswith("sleep:") and not probe_only:
            time.sleep(float(self.behaviour.split(":", 1)[1]))
        if self.behaviour.startswith("spin:") and not probe_only:
            until = time.monotonic() + float(self.behaviour.split(":", 1)[1])
            while time.monotonic() < until:
                sum(range(10_000))
        responses = []
        for request in requests:
            count = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().shape[0]
            if self.behaviour == "fail" and not probe_only:
                error = pb_utils.TritonError("the model broke")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            vectors = np.ones((count, 4), dtype=np.float32)
            info = np.full((count, 1), INFO.encode(), dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("EMBEDDING", vectors),
                        pb_utils.Tensor("MODEL_INFO", info),
                    ]
                )
            )
        return responses

    def finalize(self):
        self.clock.close()
