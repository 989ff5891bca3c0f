"""SDXL's two CLIP tokenizers: the one way raydiff loads them and turns captions into token ids, for Ray Data
preprocessing tasks, the precompute cache's empty prompt, training and tests alike.

Light on purpose (no torch): preprocessing tasks import it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from raydiff import hub

CONTEXT_LENGTH = 77  # CLIP's


def load_tokenizers(pretrained: str, revision: str | None = None) -> tuple[Any, Any]:
    """Both tokenizers of a model name (:func:`raydiff.hub.model_ref`, a local directory or ``"tiny"``), from this
    node's copy of their files: once the node has them, no hub call."""
    # Here, not at import: only the processes that tokenize pay for transformers.
    from transformers import CLIPTokenizer

    path = hub.local_pretrained(pretrained, revision, parts=hub.TOKENIZERS)
    return tuple(CLIPTokenizer.from_pretrained(path, subfolder=sub) for sub in hub.TOKENIZERS)  # type: ignore


def context_length(tokenizer: Any) -> int:
    """The tokenizer's padded length. Tokenizers saved without a config report a huge sentinel: CLIP's then."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n <= 4096 else CONTEXT_LENGTH


def tokenize(tokenizers: Sequence[Any], captions: Sequence[str]) -> tuple[np.ndarray, ...]:
    """Token ids per tokenizer, each int64 ``[len(captions), context length]``, padded and truncated like SDXL."""
    out = []
    for tok in tokenizers:
        n = context_length(tok)
        if not captions:
            out.append(np.zeros((0, n), dtype=np.int64))
            continue
        ids = tok(list(captions), padding="max_length", max_length=n, truncation=True, return_tensors="np")
        out.append(np.asarray(ids["input_ids"], dtype=np.int64))
    return tuple(out)
