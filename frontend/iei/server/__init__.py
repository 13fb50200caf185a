"""The HTTP service: FastAPI routes in front of Triton (`create_app` in `app.py`). Needs the
`server` extra; never imports torch or transformers."""
