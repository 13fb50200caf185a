"""The launcher's one failure: something it starts did not become ready."""


class TritonStartupError(RuntimeError):
    """Triton (or the frontend) did not become ready; the message is one line a person can act
    on."""
