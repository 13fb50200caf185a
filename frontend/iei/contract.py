"""The Triton side of the contract, defined once for the frontend, the launcher and the tests.

`model_repository/iei/config.pbtxt` and `model.py` hold the same names on the model's side (Triton
loads that folder alone, so it cannot import this); a unit test checks that both sides agree.
"""

MODEL_NAME = "iei"
INPUT_NAME = "IMAGE"  # TYPE_STRING [1]: the encoded image file
OUTPUT_NAME = "EMBEDDING"  # TYPE_FP32 [-1]: the raw (not normalised) vector
INFO_OUTPUT_NAME = "MODEL_INFO"  # TYPE_STRING [1], optional: JSON facts about the served model

# Dual encoders (CLIP, SigLIP, SigLIP2) only: texts into the image space.
TEXT_MODEL_NAME = "iei_text"
TEXT_INPUT_NAME = "TEXT"  # TYPE_STRING [1]: the text, UTF-8
# EMBEDDING as above; TOKENS: TYPE_INT32 [1], the text's tokens before truncation.
TOKENS_OUTPUT_NAME = "TOKENS"

# A model fails one request with `IMAGE[i]: reason` or `TEXT[i]: reason`, i the item's position
# in that request.
INVALID_INPUT_PATTERN = r"(?:IMAGE|TEXT)\[(\d+)\]: (.*)"

# Image formats decoded by the model; the frontend refuses anything else before calling Triton.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
