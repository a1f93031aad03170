# Copyright (c) radfm3d contributors. Apache-2.0.
"""Task markers, prompt building and chat formatting (template and plain fallback)."""

from __future__ import annotations

import pytest

from radfm3d.processing import build_char_tokenizer
from radfm3d.text.prompts import (
    DEFAULT_QUESTIONS,
    IMAGE_PLACEHOLDER,
    TASK_TOKENS,
    build_prompt,
    count_images,
    format_chat,
    has_chat_template,
    split_task,
    task_token,
)


def test_every_task_has_a_plain_text_marker_and_a_default_question():
    assert IMAGE_PLACEHOLDER == "<image>"
    expected = {"report", "vqa", "grounding", "refer", "compare", "modality", "region", "diagnosis", "rationale"}
    assert set(TASK_TOKENS) == expected == set(DEFAULT_QUESTIONS)
    assert all(TASK_TOKENS[t] == f"[{t}]" for t in expected)


@pytest.mark.parametrize("name, marker", [("vqa", "[vqa]"), ("[vqa]", "[vqa]"), ("vqa_presence", "[vqa]"),
                                          ("Grounding-organ", "[grounding]"), ("report", "[report]")])
def test_task_token_accepts_manifest_task_names(name, marker):
    assert task_token(name) == marker


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="known tasks"):
        task_token("segmentation")


def test_build_prompt_places_images_after_the_marker():
    assert build_prompt("vqa", "Is there a nodule?", 1) == "[vqa] <image> Is there a nodule?"
    assert build_prompt("compare", None, 2) == "[compare] <image> <image> " + DEFAULT_QUESTIONS["compare"]
    assert build_prompt("report", "Describe.", 0) == "[report] Describe."
    # placeholders written by the user stay where they are
    assert build_prompt("compare", "Prior <image> vs now <image>?", 2) == "[compare] Prior <image> vs now <image>?"
    # no double marker
    assert build_prompt("vqa", "[vqa] <image> Why?", 1) == "[vqa] <image> Why?"
    with pytest.raises(ValueError, match="placeholder"):
        build_prompt("vqa", "<image> Is it?", 2)


def test_split_and_count():
    assert split_task("[grounding] <image> Where?") == ("grounding", "<image> Where?")
    assert split_task("[foo] bar") == (None, "[foo] bar")
    assert count_images("<image><image> x <image>") == 3


def test_format_chat_plain_fallback():
    tok = build_char_tokenizer()
    assert not has_chat_template(tok)
    assert format_chat(tok, "<image> Q?") == "User: <image> Q?\nAssistant:"
    text = format_chat(tok, "Q2", system="Be brief.", history=[("Q1", "A1")])
    assert text == "Be brief.\nUser: Q1\nAssistant: A1\nUser: Q2\nAssistant:"
    assert format_chat(tok, "Q", add_generation_prompt=False) == "User: Q"


def test_format_chat_uses_the_tokenizer_template():
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert has_chat_template(tok)
    assert format_chat(tok, "<image> Q?", system="S") == "<system>S\n<user><image> Q?\n<assistant>"
