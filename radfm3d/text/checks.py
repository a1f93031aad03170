# Copyright (c) radfm3d contributors. Apache-2.0.
"""Checks on text before any compute: prompts are ``str`` that UTF-8 can encode, and prompts fit the LLM's context.

In the text layer so that the processor and ``RadFM3DForCausalLM.generate`` (modeling may import text, not
processing) share one rule and one message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from radfm3d.errors import RadFM3DInputError

__all__ = ["check_text", "check_context_length"]


def check_text(text: Any, source: str) -> str:
    """``text`` if it is a ``str`` that UTF-8 can encode; else ``RadFM3DInputError`` naming ``source``.

    Refused: ``bytes``/``bytearray`` (decode them first: the processor never guesses an encoding), non-strings
    (``None``, numbers, ...), and strings holding lone surrogates (``"\\ud800"``, e.g. from
    ``open(..., errors="surrogateescape")``), which no tokenizer can encode.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        raise RadFM3DInputError(source, f"is {type(text).__name__}, not text; decode it first "
                                "(e.g. data.decode('utf-8'))")
    if not isinstance(text, str):
        raise RadFM3DInputError(source, f"must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RadFM3DInputError(source, f"holds a lone surrogate {text[err.start]!r} at character {err.start}, "
                                "which is not valid Unicode text (was it read with errors='surrogateescape'?)"
                                ) from None
    return text


def _rows(values: Any) -> list[list[int]]:
    """``(B, L)`` tensor / list of lists, or one ``(L,)`` row -> list of rows."""
    rows = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if rows and not isinstance(rows[0], (list, tuple)) and not isinstance(rows[0], torch.Tensor):
        return [[int(v) for v in rows]]
    return [[int(v) for v in (r.tolist() if isinstance(r, torch.Tensor) else r)] for r in rows]


def check_context_length(
    input_ids: Any,
    context_length: int,
    *,
    attention_mask: Any = None,
    max_new_tokens: int = 0,
    image_token_ids: Sequence[int] = (),
    source: str = "prompt",
) -> None:
    """Refuse, before any compute, prompts that do not fit the LLM's context.

    ``input_ids``: ``(B, L)`` tensor or a list of id lists (image placeholders already expanded);
    ``attention_mask`` (same shape, optional): only its 1s count (padding is not part of a prompt).
    Raises ``RadFM3DInputError`` naming the sample and the numbers when ``tokens + max_new_tokens`` exceeds
    ``context_length``; ``image_token_ids`` (start, end, pad ids) let the message say how many tokens the images
    take. ``max_new_tokens`` must be >= 0 here (``generate`` checks >= 1 itself).
    """
    context_length = int(context_length)
    max_new_tokens = int(max_new_tokens)
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if max_new_tokens < 0:
        raise RadFM3DInputError("max_new_tokens", f"must be >= 0, got {max_new_tokens}")
    rows = _rows(input_ids)
    masks = _rows(attention_mask) if attention_mask is not None else None
    image_ids = {int(i) for i in image_token_ids}
    for b, row in enumerate(rows):
        kept = row if masks is None else [t for t, m in zip(row, masks[b]) if m]
        n = len(kept)
        if n + max_new_tokens <= context_length:
            continue
        n_image = sum(1 for t in kept if int(t) in image_ids)
        detail = f" ({n_image} of them image tokens)" if n_image else ""
        room = context_length - n
        hint = (f"at most {room} new tokens fit" if room > 0
                else "shorten the prompt or use fewer/smaller images")
        raise RadFM3DInputError(
            f"{source}[{b}]", f"{n} prompt tokens{detail} + max_new_tokens={max_new_tokens} = "
            f"{n + max_new_tokens} exceed the LLM's context of {context_length} tokens; {hint}")
