# Copyright (c) radfm3d contributors. Apache-2.0.
"""Prompts: task tokens (MiniGPT-Med style plain-text markers), the ``<image>`` placeholder and chat formatting.

One model serves every task; the task is named by a marker at the start of the prompt, e.g.
``"[vqa] <image> Is there a nodule in the left lung?"``. The markers are ordinary text (no new vocabulary):
the LLM reads them like any word, so nothing about the tokenizer or the embeddings changes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "IMAGE_PLACEHOLDER",
    "TASK_TOKENS",
    "DEFAULT_QUESTIONS",
    "task_token",
    "build_prompt",
    "count_images",
    "split_task",
    "format_chat",
    "has_chat_template",
]

#: what users write in text where an image goes; the processor expands it to the image's visual tokens
IMAGE_PLACEHOLDER = "<image>"

#: task name -> marker written at the start of the prompt
TASK_TOKENS: dict[str, str] = {
    "report": "[report]",         # report generation
    "vqa": "[vqa]",               # open / closed visual question answering
    "grounding": "[grounding]",   # finding -> 3D box(es) as <box> text
    "refer": "[refer]",           # box -> description of what is there (referring)
    "compare": "[compare]",       # change against a prior scan (two images)
    "modality": "[modality]",     # which modality / sequence
    "region": "[region]",         # which body region
    "diagnosis": "[diagnosis]",   # presence of findings
    "rationale": "[rationale]",   # explanation of an answer
}

#: a default question per task (used when ``build_prompt`` gets none)
DEFAULT_QUESTIONS: dict[str, str] = {
    "report": "Write the findings and impression of the radiology report for this scan.",
    "vqa": "Describe the scan.",
    "grounding": "Locate the abnormality and give its 3D box.",
    "refer": "What is in this region?",
    "compare": "Compare the current scan with the prior scan and describe the changes.",
    "modality": "What is the imaging modality of this scan?",
    "region": "Which body region does this scan show?",
    "diagnosis": "Which findings are present in this scan?",
    "rationale": "Explain the reasoning behind the answer.",
}

_MARKER = re.compile(r"^\s*\[([a-z_]+)\]\s*", re.IGNORECASE)


def task_token(task: str) -> str:
    """Marker of a task: ``"vqa"``, ``"[vqa]"`` and manifest task names with a suffix (``"vqa_presence"``,
    ``"grounding-organ"``) all give ``"[vqa]"`` / ``"[grounding]"``. Unknown tasks raise ``ValueError``."""
    name = str(task).strip().lower().strip("[]")
    if name in TASK_TOKENS:
        return TASK_TOKENS[name]
    head = re.split(r"[_\-\s.:/]", name, maxsplit=1)[0]
    if head in TASK_TOKENS:
        return TASK_TOKENS[head]
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_TOKENS)}")


def count_images(text: str, placeholder: str = IMAGE_PLACEHOLDER) -> int:
    """Number of image placeholders in ``text``."""
    return str(text).count(placeholder)


def split_task(prompt: str) -> tuple[str | None, str]:
    """``"[vqa] <image> Is ...?"`` -> ``("vqa", "<image> Is ...?")``; ``(None, prompt)`` without a known marker."""
    match = _MARKER.match(prompt)
    if match and match.group(1).lower() in TASK_TOKENS:
        return match.group(1).lower(), prompt[match.end():]
    return None, prompt


def build_prompt(task: str, question: str | None = None, n_images: int | None = 1, *,
                 placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """``"<task marker> <image> ... <image> <question>"``.

    ``question`` None uses :data:`DEFAULT_QUESTIONS`. If the question already holds placeholders they are kept
    where they are (their count must equal ``n_images`` unless ``n_images`` is None); otherwise ``n_images``
    placeholders are put in front of it. Raises ``ValueError`` on a count mismatch.
    """
    marker = task_token(task)
    text = (DEFAULT_QUESTIONS[marker.strip("[]")] if question is None else str(question)).strip()
    _, text = split_task(text)  # never two markers
    present = count_images(text, placeholder)
    if present:
        if n_images is not None and present != n_images:
            raise ValueError(f"the question holds {present} {placeholder} placeholder(s) but n_images={n_images}")
        return f"{marker} {text}"
    n = 0 if n_images is None else int(n_images)
    if n < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    images = " ".join([placeholder] * n)
    return " ".join(part for part in (marker, images, text) if part)


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template (e.g. SmolLM2-Instruct)."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_chat(tokenizer: Any, prompt: str, *, system: str | None = None,
                history: Sequence[tuple[str, str]] = (), add_generation_prompt: bool = True) -> str:
    """One user turn (after optional earlier ``(user, assistant)`` turns) as the text the LLM expects.

    Uses the tokenizer's chat template when it has one; otherwise a plain
    ``"[system\\n]User: ...\\nAssistant: ...\\nUser: <prompt>\\nAssistant:"`` layout. With
    ``add_generation_prompt`` the text ends where the assistant's answer starts.
    """
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": prompt})
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    lines = [system] if system else []
    for user, assistant in history:
        lines += [f"User: {user}", f"Assistant: {assistant}"]
    lines.append(f"User: {prompt}")
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)
