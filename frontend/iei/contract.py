"""The Triton side of the contract, defined once for the frontend, the launcher and the tests.

`model_repository/iei/config.pbtxt` and `model.py` hold the same names on the model's side (Triton
loads that folder alone, so it cannot import this); a unit test checks that both sides agree.
"""

MODEL_NAME = "iei"
INPUT_NAME = "IMAGE"  # TYPE_STRING [1]: the encoded image file
OUTPUT_NAME = "EMBEDDING"  # TYPE_FP32 [-1]: the raw (not normalised) vector
INFO_OUTPUT_NAME = "MODEL_INFO"  # TYPE_STRING [1], optional: JSON facts about the served model

# The model's dynamic batcher has two priority levels (the launcher renders them): 1 goes to the
# head of the queue, for probes of the model's health; every other request has 2.
PROBE_PRIORITY = 1
QUEUE_PRIORITY_LEVELS = 2

# The split layout (IEI_TRITON_LAYOUT): `iei` is an ensemble of these two, decoding and resizing
# on CPU instances, then normalising and encoding on the model's device.
STAGE_MODEL_NAMES = ("iei_preprocess", "iei_encoder")

# Model states in Triton's repository index (explicit model control: the launcher's unloading,
# the frontend's loading on demand).
MODEL_READY, MODEL_LOADING, MODEL_UNLOADING = "READY", "LOADING", "UNLOADING"
# IEI_MAX_LOADED_MODELS: a model that ran an inference within IEI_REQUEST_TIMEOUT (the longest a
# request that used it may still run), and at least this many seconds, is in use: it is not
# unloaded to make room for another.
IN_USE_SECONDS = 5.0

# Dual encoders (CLIP, SigLIP, SigLIP2) only: texts into the image space.
TEXT_MODEL_NAME = "iei_text"
TEXT_INPUT_NAME = "TEXT"  # TYPE_STRING [1]: the text, UTF-8
# EMBEDDING as above; TOKENS: TYPE_INT32 [1], the text's tokens before truncation. A request for
# TOKENS alone is answered without running the text tower.
TOKENS_OUTPUT_NAME = "TOKENS"

# A model fails one request with `IMAGE[i]: reason` or `TEXT[i]: reason`, i the item's position
# in that request.
INVALID_INPUT_PATTERN = r"(?:IMAGE|TEXT)\[(\d+)\]: (.*)"

# Image formats decoded by the model; the frontend refuses anything else before calling Triton.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO

# A 1x1 PNG: the cheapest image to ask the model whether it answers (health probes).
PROBE_IMAGE = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415478da63f8cfc000000301010018dd8db00000000049454e44ae426082"
)

# /dev/shm regions, named `<prefix><pid>-…` after the process that owns them, so that whoever
# finds one whose process is gone (killed outright) removes it: a frontend worker's region of
# image files for Triton, and the Python stubs' regions of the Triton an `iei serve` started.
FRONTEND_REGIONS = "iei-frontend-"
STUB_REGIONS = "iei-"

# Each model instance's execution clock (model_repository/iei_runtime/executions.py): the launcher
# names a folder in this variable of the Triton it runs; each stub keeps there a file named by its
# pid holding one double in this struct format, the CLOCK_MONOTONIC second its current execution
# began (0 while it waits). In one execution for long without computing is hung.
EXECUTION_CLOCKS_ENV = "IEI_EXECUTION_CLOCKS"
EXECUTION_CLOCK_FORMAT = "<d"
# The same instances show an execution that has run for seconds on Triton's metrics port, for a
# frontend that has neither the file nor /proc (another container): gauges labelled by `model`
# and `instance`, its seconds so far and the cores its process used over its last seconds.
EXECUTION_SECONDS_METRIC = "iei_execution_seconds"
EXECUTION_CORES_METRIC = "iei_execution_cores"

# Triton restarts so far by its launcher (`iei serve`, `iei triton`), by reason, given to each
# Triton it starts in this variable (`reason=count,...`): the default model's instances show them
# on Triton's metrics port as the gauge RESTARTS_METRIC{reason}, the one port that a Triton
# container's scrape annotation names (the frontend's /metrics counts them only under `iei serve`).
TRITON_RESTARTS_ENV = "IEI_TRITON_RESTARTS"
RESTARTS_METRIC = "iei_triton_restarts"
