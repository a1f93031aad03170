# Copyright (c) radfm3d contributors. Apache-2.0.
"""Box snapping: the LLM says *which* finding, the vision heads say *where* it is.

A grounding answer is ``<box>x1,y1,z1,x2,y2,z2</box>`` (0..99 on the model grid, :mod:`radfm3d.text.boxes`). The
LLM of a small model writes the box of the right finding in roughly the right place, but not precisely (on the
phantom val split, a hit@0.3 of 0.30 for findings of 20 mm and more, 0 below 10 mm), while the latent head trained in
vision pre-training regresses one finding box per structure (:class:`~radfm3d.modeling.heads.StructuredFindingsHead`,
``finding_box``). With box snapping on (findings-prompt spec key ``snap_boxes``), every well-formed box the LLM
generates is compared with the head's boxes for the finding sites of the region the head reads: the finding box of
every site and the structure (organ) box of every site. If the candidate overlapping the LLM's box most (3D IoU) is a
finding box, the LLM's box is replaced by it; an organ box winning (the LLM outlined an organ) or no overlap at all
keeps the LLM's box. The head's finding boxes are averaged over the scan and the prompt's ``test_time_shifts`` copies
(each shift undone). Chosen on the val split and measured on held-out data: bundle docs.

The rewrite happens in token space inside ``RadFM3DForCausalLM.generate`` (the model holds no tokenizer): the spec
keeps the token ids of the ten digits, the comma and the tokens around a box body, checked when the spec is built
(:func:`build_box_tokens`), so that every consumer of ``generate`` (the bundles, the Python API) sees the same
snapped text. What counts as a well-formed box is :func:`radfm3d.text.boxes.parse_boxes`'s rule, the one the processor
and the evaluation use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["box_iou", "snap_box", "build_box_tokens", "BoxTokens"]

Box = tuple[int, int, int, int, int, int]

#: body used to learn how a tokenizer writes box coordinates (every digit, two-digit values, the 0..99 range)
_PROBE_BODY = "10,23,45,67,89,99"
#: texts a box follows in answers ("<box>..." at the start, after a space, after a colon or a new line)
_PROBE_LEADS = ("", " ", ": ", "\n", "The box: ")


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


def build_box_tokens(tokenizer: Any) -> dict[str, Any]:
    """How ``tokenizer`` writes a box: ``{"digits": [id of "0", ..., id of "9"], "comma": id, "open": [[id, id],
    ...], "close": [id, ...]}`` — the two tokens before a box body (e.g. ``box``, ``>``) and the first token after it
    (e.g. ``</``), over the contexts a box follows. Raises ``ValueError`` when the tokenizer does not write box
    coordinates digit by digit (e.g. merges ``"23"`` into one token): the model could not rewrite them then."""
    def encode(text: str) -> list[int]:
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]

    digits = [encode(str(d)) for d in range(10)]
    comma = encode(",")
    if any(len(ids) != 1 for ids in digits) or len(comma) != 1 or len({ids[0] for ids in digits}) != 10:
        raise ValueError("box snapping needs a tokenizer that writes each digit and the comma as one token")
    digit_ids, comma_id = [ids[0] for ids in digits], comma[0]
    body = [comma_id if c == "," else digit_ids[int(c)] for c in _PROBE_BODY]
    opens: set[tuple[int, int]] = set()
    closes: set[int] = set()
    for lead in _PROBE_LEADS:
        ids = encode(f"{lead}<box>{_PROBE_BODY}</box>.")
        starts = [i for i in range(2, len(ids) - len(body)) if ids[i: i + len(body)] == body]
        if not starts:
            raise ValueError(f"box snapping: the tokenizer does not write {lead!r}<box>{_PROBE_BODY}</box> digit by "
                             "digit, so the model cannot rewrite its boxes")
        start = starts[0]
        opens.add((ids[start - 2], ids[start - 1]))
        closes.add(ids[start + len(body)])
    return {"digits": digit_ids, "comma": comma_id, "open": sorted([list(o) for o in opens]),
            "close": sorted(closes)}


class BoxTokens:
    """Find and rewrite box bodies in generated token ids with the ids of :func:`build_box_tokens`."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.digits = [int(i) for i in spec["digits"]]
        self.comma = int(spec["comma"])
        self.opens = {tuple(int(i) for i in pair) for pair in spec["open"]}
        self.closes = {int(i) for i in spec["close"]}
        self._digit_of = {token: d for d, token in enumerate(self.digits)}

    def find(self, ids: Sequence[int]) -> list[tuple[int, int, Box]]:
        """``ids`` -> ``[(start, end, box), ...]``: every body ``ids[start:end]`` between an opening and a closing
        box token that reads as six whole numbers 0..99 (malformed bodies are left alone)."""
        found = []
        i = 2
        while i < len(ids):
            if (int(ids[i - 2]), int(ids[i - 1])) not in self.opens:
                i += 1
                continue
            end = i
            while end < len(ids) and (int(ids[end]) in self._digit_of or int(ids[end]) == self.comma):
                end += 1
            box = self._parse(ids[i:end]) if end < len(ids) and int(ids[end]) in self.closes else None
            if box is not None:
                found.append((i, end, box))
            i = end + 1
        return found

    def _parse(self, body: Sequence[int]) -> Box | None:
        """Digit / comma ids -> the ordered box, or None when the text is not a well-formed box."""
        from radfm3d.text.boxes import parse_boxes

        text = "".join("," if int(t) == self.comma else str(self._digit_of[int(t)]) for t in body)
        boxes = parse_boxes(f"<box>{text}</box>")
        return boxes[0] if boxes else None

    def encode(self, box: Sequence[int]) -> list[int]:
        """Six 0..99 ints -> the body's token ids (``x1,y1,z1,x2,y2,z2``)."""
        ids: list[int] = []
        for k, value in enumerate(box):
            ids += ([self.comma] if k else []) + [self.digits[int(c)] for c in str(int(value))]
        return ids

    def rewrite(self, ids: Sequence[int], replacements: Sequence[tuple[int, int, Sequence[int]]]) -> list[int]:
        """``ids`` with each body ``ids[start:end]`` replaced by the body of its new box (``(start, end, box)``,
        as :meth:`find` returns them, in order)."""
        out: list[int] = []
        last = 0
        for start, end, box in replacements:
            out += list(ids[last:start]) + self.encode(box)
            last = end
        return out + list(ids[last:])
