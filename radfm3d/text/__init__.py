# Copyright (c) radfm3d contributors. Apache-2.0.
"""Text side of radfm3d: task prompts, chat formatting, the ``<box>`` codec, box post-processing, and the checks
on prompts (``check_text``, ``check_context_length``).

``boxes_from_text`` (in :mod:`radfm3d.text.postprocess`) needs :mod:`radfm3d.transforms` and is imported lazily.
"""

from __future__ import annotations

from radfm3d.text.boxes import (
    BOX_MAX,
    format_box,
    format_boxes,
    grid_box_to_normalised,
    normalised_to_grid_box,
    order_box,
    parse_boxes,
)
from radfm3d.text.checks import check_context_length, check_text
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
from radfm3d.utils import lazy_exports

__all__ = [
    "BOX_MAX",
    "DEFAULT_QUESTIONS",
    "IMAGE_PLACEHOLDER",
    "TASK_TOKENS",
    "boxes_from_text",
    "build_prompt",
    "check_context_length",
    "check_text",
    "count_images",
    "format_box",
    "format_boxes",
    "format_chat",
    "grid_box_to_normalised",
    "has_chat_template",
    "normalised_to_grid_box",
    "order_box",
    "parse_boxes",
    "split_task",
    "task_token",
]


__getattr__ = lazy_exports("radfm3d.text", {"boxes_from_text": "radfm3d.text.postprocess"})
