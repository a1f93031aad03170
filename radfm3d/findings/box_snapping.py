# Copyright (c) radfm3d contributors. Apache-2.0.
"""Box snapping: the LLM says *which* finding, the vision heads say *where* it is.

A grounding answer is ``<box>x1,y1,z1,x2,y2,z2</box>`` (0..99 on the model grid, :mod:`radfm3d.text.boxes`). The
LLM of a small model writes the box of the right finding in roughly the right place, but not precisely (on the
phantom val split, a hit@0.3 of 0.30 for findings of 20 mm and more, 0 below 10 mm), while the latent head trained in
vision pre-training regresses one finding box per structure (:class:`~radfm3d.findings.heads.StructuredFindingsHead`,
``finding_box``). With box snapping on (reader setting ``snap_boxes``), every well-formed box the LLM
generates is compared with the head's boxes for the finding sites of the region the head reads: the finding box of
every site and the structure (organ) box of every site. If the candidate overlapping the LLM's box most (3D IoU) is a
finding box, the LLM's box is replaced by it; an organ box winning (the LLM outlined an organ) or no overlap at all
keeps the LLM's box. The head's finding boxes are averaged over the scan and the reader's ``test_time_shifts`` copies
(each shift undone). Chosen on the val split and measured on held-out data: bundle docs.

Snapping is a post-processing step on the generated *text* (as a processor's ``post_process_generation``, e.g.
Kosmos-2's): :func:`snap_text` rewrites the boxes of an answer, and the findings model
(:class:`radfm3d.findings.model.RadFM3DFindingsModel`) applies it to its own ``generate`` output with its tokenizer,
re-encoding only the answers whose boxes changed, so every consumer of ``generate`` sees the same snapped text. What
counts as a well-formed box is :func:`radfm3d.text.boxes.parse_boxes`'s rule, the one the processor and the
evaluation use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["box_iou", "snap_box", "snap_text"]

Box = tuple[int, int, int, int, int, int]



def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """3D IoU of corner boxes ``(..., 6)`` ``(lo0, lo1, lo2, hi0, hi1, hi2)`` (broadcasting; any consistent unit)."""
    lo, hi = torch.maximum(a[..., :3], b[..., :3]), torch.minimum(a[..., 3:], b[..., 3:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    vol = lambda x: (x[..., 3:] - x[..., :3]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (vol(a) + vol(b) - inter).clamp_min(1e-9)


def snap_box(box: Sequence[int], finding_boxes: Sequence[Sequence[int]], structure_boxes: Sequence[Sequence[int]]
             ) -> tuple[Box, int | None]:
    """The LLM's ``box`` (six 0..99 ints) -> ``(box to write, index of the finding box used or None)``: the finding
    box (``(K, 6)``, one per site) if it overlaps ``box`` more than every other finding box and every structure box
    (``(K, 6)``) and overlaps at all; otherwise ``box`` unchanged."""
    llm = torch.tensor([list(box)], dtype=torch.float64)
    findings = torch.tensor([list(b) for b in finding_boxes], dtype=torch.float64).reshape(-1, 6)
    structures = torch.tensor([list(b) for b in structure_boxes], dtype=torch.float64).reshape(-1, 6)
    if not len(findings):
        return tuple(int(v) for v in box), None  # type: ignore[return-value]
    finding_iou, structure_iou = box_iou(llm, findings), box_iou(llm, structures)
    best = int(finding_iou.argmax())
    best_structure = float(structure_iou.max()) if len(structures) else 0.0
    if float(finding_iou[best]) > 0 and float(finding_iou[best]) >= best_structure:
        return tuple(int(v) for v in finding_boxes[best]), best  # type: ignore[return-value]
    return tuple(int(v) for v in box), None  # type: ignore[return-value]


def snap_text(text: str, candidates: Mapping[str, Sequence[Sequence[int]]]) -> tuple[str, list[int | None]]:
    """Post-process one generated answer: every well-formed ``<box>...</box>`` of ``text``
    (:func:`radfm3d.text.boxes.parse_boxes`'s rule) goes through :func:`snap_box` against ``candidates``
    (``{"finding": [...], "structure": [...]}``, :meth:`radfm3d.findings.reader.FindingsReader.site_boxes`) and is
    written back as :func:`radfm3d.text.boxes.format_box` when it changed. Returns ``(text, [finding index used or
    None per box])``; malformed boxes are left as written."""
    from radfm3d.text.boxes import BOX_PATTERN, format_box, parse_boxes

    used: list[int | None] = []

    def replace(match: Any) -> str:
        boxes = parse_boxes(match.group(0))
        if not boxes:
            return match.group(0)
        box, index = snap_box(boxes[0], candidates.get("finding", ()), candidates.get("structure", ()))
        used.append(index)
        return format_box(box)

    return BOX_PATTERN.sub(replace, text), used
