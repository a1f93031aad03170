# Copyright (c) radfm3d contributors. Apache-2.0.
"""radfm3d.text.checks: the prompt checks the processor and generate share."""

from __future__ import annotations

import pytest
import torch

from radfm3d.errors import RadFM3DInputError
from radfm3d.text.checks import check_context_length, check_text


def test_check_text():
    assert check_text("ünïcode ✓ 日本", "p") == "ünïcode ✓ 日本"
    with pytest.raises(RadFM3DInputError, match="^p: is bytes, not text; decode it first"):
        check_text(b"abc", "p")
    with pytest.raises(RadFM3DInputError, match="^p: is memoryview"):
        check_text(memoryview(b"abc"), "p")
    with pytest.raises(RadFM3DInputError, match=r"^q: holds a lone surrogate '\\udc80' at character 2"):
        check_text(b"ab\x80".decode("utf-8", errors="surrogateescape"), "q")
    with pytest.raises(RadFM3DInputError, match="must be a string, got float"):
        check_text(1.5, "p")


def test_check_context_length_counts_real_tokens_and_names_the_numbers():
    check_context_length([[1, 2, 3]], 5, max_new_tokens=2)
    check_context_length([1, 2, 3], 3)  # one unbatched row
    with pytest.raises(RadFM3DInputError, match=r"^prompt\[0\]: 3 prompt tokens \+ max_new_tokens=3 = 6 exceed the "
                       r"LLM's context of 5 tokens; at most 2 new tokens fit$"):
        check_context_length([[1, 2, 3]], 5, max_new_tokens=3)
    ids = torch.tensor([[0, 0, 9, 9, 9, 4], [5, 9, 9, 9, 6, 7]])  # 9 = image tokens; left padding in row 0
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(RadFM3DInputError, match=r"^prompt\[1\]: 6 prompt tokens \(3 of them image tokens\) \+ "
                       r"max_new_tokens=0 = 6 exceed the LLM's context of 5 tokens; shorten the prompt"):
        check_context_length(ids, 5, attention_mask=mask, image_token_ids=[9])
    check_context_length(ids[:1], 5, attention_mask=mask[:1], max_new_tokens=1)
    with pytest.raises(RadFM3DInputError, match="max_new_tokens: must be >= 0"):
        check_context_length(ids, 5, max_new_tokens=-1)
    with pytest.raises(ValueError, match="context_length must be >= 1"):
        check_context_length(ids, 0)
