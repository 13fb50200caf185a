"""Texts -> vectors of the image space, for dual encoders (CLIP, SigLIP, SigLIP2); no Triton here.

Texts are tokenized as the model was trained: the checkpoint's own tokenizer, truncated to the
text tower's context (keeping the end-of-text token), SigLIP's padded to the full context (its
text tower pools the last position, so the padding changes the vector).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .embedder import Inputs, run_encoder
from .engines import Choice


class InvalidText(ValueError):
    """One text cannot be embedded (not UTF-8, empty, too long). Fails only its own request."""


def decode_text(data: bytes, max_chars: int) -> str:
    """UTF-8 bytes -> the text, or an `InvalidText` saying why not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidText(f"not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    if not text.strip():
        raise InvalidText("empty text")
    if len(text) > max_chars:
        raise InvalidText(
            f"text of {len(text)} characters is over the limit of {max_chars} characters"
        )
    return text


def folds_case(tokenizer: Any) -> bool:
    """Whether the tokenizer lower-cases by itself (CLIP's and SigLIP's do, Gemma's does not)."""
    return bool(tokenizer.tokenize("Photo OF A Cat") == tokenizer.tokenize("photo of a cat"))


class TextEmbedder:
    """Tokenizer + text tower for one batch of texts."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        context: int,
        pad_to_context: bool,
        lower_case: bool,
        max_chars: int,
        forward_batch_size: int,
    ) -> None:
        self.encoder = encoder  # tokenizer tensors -> (N, D), the projection included
        self.run: Callable[..., torch.Tensor] = encoder  # or its engine's runner (engines.py)
        self.choice = Choice("torch", str(dtype).removeprefix("torch."))
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.context = context
        self.padding = "max_length" if pad_to_context else "longest"
        self.lower_case = lower_case  # fold case here: trained lower-cased, tokenizer does not
        self.max_chars = max_chars
        self.forward_batch_size = forward_batch_size
        # CPU threads of a pass (0 on a GPU) and, where chosen at load, why that many.
        self.forward_threads = 0
        self.thread_note = ""
        # The tokenizer's own names (SigLIP2's has no attention mask: it was trained without one).
        self.input_names = tuple(getattr(tokenizer, "model_input_names", ("input_ids",)))

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text before truncation, the special ones included."""
        tokens = self.tokenizer(texts, truncation=False, verbose=False, split_special_tokens=True)
        return [len(row) for row in tokens["input_ids"]]

    def tokenize(self, texts: list[str]) -> Inputs:
        """The model's input for `texts`, each cut to the context (its end token kept). A special
        token's text in a client's text (CLIP's `<|endoftext|>`) is read as text: as the token
        it ended the text there for the model (CLIP pools at the first end token), silently."""
        tokens = self.tokenizer(
            texts,
            split_special_tokens=True,
            padding=self.padding,
            truncation=True,
            max_length=self.context,
            return_tensors="pt",
        )
        return {name: tokens[name] for name in self.input_names if name in tokens}

    def forward(self, batch: Inputs) -> np.ndarray:
        return run_encoder(
            self.run, batch,
            device=self.device, dtype=self.dtype, forward_batch_size=self.forward_batch_size,
        )  # fmt: skip

    def embed(self, blobs: Sequence[bytes]) -> tuple[list[np.ndarray | InvalidText], list[int]]:
        """Every text of a dynamic batch -> its vector or the reason it has none, and its
        tokens before truncation (0 for a refused text)."""
        results, tokens = self.count(blobs)
        ready = [i for i, result in enumerate(results) if isinstance(result, str)]
        if ready:
            vectors = self.forward(self.tokenize([results[i] for i in ready]))
            for i, vector in zip(ready, vectors, strict=True):
                results[i] = vector
        return results, tokens

    def count(self, blobs: Sequence[bytes]) -> tuple[list[str | InvalidText], list[int]]:
        """Every text, as the tower reads it (case folded where it was trained so), or the
        reason it cannot be embedded, and its tokens before truncation (0 for a refused text):
        what `embed` does but the text tower."""
        results: list[str | InvalidText] = []
        for blob in blobs:
            try:
                text = decode_text(blob, self.max_chars)
                results.append(text.lower() if self.lower_case else text)
            except InvalidText as exc:
                results.append(exc)
        ready = {i: text for i, text in enumerate(results) if isinstance(text, str)}
        tokens = [0] * len(results)
        counts = self.token_counts(list(ready.values())) if ready else []
        for i, count in zip(ready, counts, strict=True):
            tokens[i] = count
        return results, tokens

    def warm_up(self) -> None:
        self.forward(self.tokenize(["a photo of a cat"]))
