"""`iei serve` and `iei triton`: NVIDIA Triton (found, rendered, run and supervised) and the HTTP
frontend as processes. Needs the `serve` extra (Triton, torch); runs on Python 3.10 in the Triton
image."""
