"""Code the Triton models of this repository share: settings, image decoding, pooling, the
batched forward pass, model loading and Triton responses. Not a model: the launcher loads the
models by name (`--model-control-mode=explicit`), and each model's `model.py` puts this
repository's top folder on `sys.path`. It never imports the frontend (`iei`)."""
