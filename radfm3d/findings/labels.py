# Copyright (c) radfm3d contributors. Apache-2.0.
"""Structured labels of a scan, as fixed-size tensors shaped by a :class:`~radfm3d.findings.schema.LabelSchema`.

Input is a ``cases.jsonl`` file (one case per line, the RadPhantom layout; a user with segmentations writes the same
fields for their own scans): ``modality``, ``sequence``, ``region``, ``organs`` (``structure``, ``box_grid``),
``findings`` (``type``, ``structure`` or ``organ`` + ``side``, ``size_mm``, ``box_grid``), optional ``flags``
(names), ``prior`` (its own ``findings``), ``grid_geometry`` and ``images``. A finding's structure is its
``structure`` field, else the schema structure whose ``case`` key is ``"organ/side"``.

Per image, for the schema's outputs (``S`` structures; boxes are ``(x0, y0, z0, x1, y1, z1)`` on the model grid
divided by the grid size, so in [0, 1] like the 0-99 box text; ``C`` = ``max_count``):

==================== ============ ===========================================================
key                  shape/dtype  meaning (-100 / mask 0 = not supervised)
==================== ============ ===========================================================
modality             () long      modality class (schema ``modalities``)
region               () long      region class (schema ``regions``)
total_count          () long      number of findings, capped at C
flags                (F,) float   per-scan abnormality flags (schema ``flags``)
structure_present    (S,) float   structure is in this scan's region
structure_box        (S, 6) float structure box (mask ``structure_box_mask``)
finding_present      (S,) float   the structure holds a finding (mask = ``structure_present``)
finding_count        (S,) long    findings in the structure, capped at C (-100 outside the region)
finding_type         (S,) long    type of its largest finding (-100 when none)
finding_box          (S, 6) float box of its largest finding (mask ``finding_mask``)
finding_size         (S,) float   log(longest diameter / 10 mm) of the largest finding (mask ``finding_mask``)
==================== ============ ===========================================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from radfm3d.findings.schema import LabelSchema

__all__ = ["IGNORE", "labels_for_image", "structured_records"]

IGNORE = -100


def _unit_box(box_grid: Sequence[float], spatial_size: Sequence[int]) -> list[float]:
    size = [float(s) for s in spatial_size] * 2
    return [min(1.0, max(0.0, float(v) / s)) for v, s in zip(box_grid, size)]


def _modality_class(schema: LabelSchema, modality: str, sequence: str | None) -> int:
    for key in (str(modality), f"{modality}/{sequence}", str(modality).upper(),
                f"{str(modality).upper()}/{str(sequence or '').upper()}"):
        if key in schema.modality_case:
            return schema.modality_case[key]
    raise ValueError(f"unknown modality/sequence {modality!r}/{sequence!r}; the schema knows "
                     f"{sorted(schema.modality_case)}")


def _finding_structure(schema: LabelSchema, finding: Mapping[str, Any]) -> str:
    if finding.get("structure") in schema.structures:
        return str(finding["structure"])
    key = f"{finding.get('organ')}/{finding.get('side')}"
    if key not in schema.structure_case:
        raise ValueError(f"finding at {key!r} is not a structure of the schema")
    return schema.structure_case[key]


def labels_for_image(case: Mapping[str, Any], schema: LabelSchema, prior: bool = False) -> dict[str, torch.Tensor]:
    """The structured labels (see the module table) of a case's current scan, or of its prior (``prior=True``;
    structure boxes are then unsupervised, since a case lists organ boxes on the current grid only)."""
    source = case["prior"] if prior else case
    findings = source.get("findings", [])
    out: dict[str, torch.Tensor] = {}
    cap = schema.max_count
    if schema.has("modality"):
        out["modality"] = torch.tensor(_modality_class(schema, case["modality"], case.get("sequence")))
    if schema.has("region"):
        out["region"] = torch.tensor(schema.regions.index(case["region"]))
    if schema.has("total_count"):
        out["total_count"] = torch.tensor(min(cap, len(findings)))
    if schema.has("flags"):
        flags = torch.zeros(len(schema.flags))
        named = set(source.get("flags") or [])
        for f in findings:
            named.update(schema.flag_of_finding(f))
        for name in named:
            if name in schema.flags:
                flags[schema.flags.index(name)] = 1.0
        out["flags"] = flags
    if not schema.structures:
        return out
    n = len(schema.structures)
    spatial_size = source["grid_geometry"]["spatial_size"]
    region = case.get("region", "")
    present = torch.tensor([1.0 if (not schema.regions or region in schema.structure_regions[s]) else 0.0
                            for s in schema.structures])
    out["structure_present"] = present
    if schema.has("structure_box"):
        structure_box, mask = torch.zeros(n, 6), torch.zeros(n)
        if not prior:
            for organ in case.get("organs", []):
                if organ.get("structure") in schema.structures:
                    i = schema.structures.index(organ["structure"])
                    structure_box[i] = torch.tensor(_unit_box(organ["box_grid"], spatial_size))
                    mask[i] = 1.0
        out["structure_box"], out["structure_box_mask"] = structure_box, mask
    if not schema.has_findings:
        return out
    finding_count = torch.where(present > 0, 0, IGNORE).long()
    finding_type = torch.full((n,), IGNORE, dtype=torch.long)
    finding_box, finding_size, largest = torch.zeros(n, 6), torch.zeros(n), torch.zeros(n)
    for f in findings:
        i = schema.structures.index(_finding_structure(schema, f))
        finding_count[i] = min(cap, int(finding_count[i]) + 1)
        if float(f["size_mm"]) > largest[i]:
            largest[i] = float(f["size_mm"])
            finding_type[i] = schema.finding_types.index(f["type"])
            finding_box[i] = torch.tensor(_unit_box(f["box_grid"], spatial_size))
            finding_size[i] = math.log(float(f["size_mm"]) / 10.0)
    finding_mask = (largest > 0).float()
    out.update({"finding_present": finding_mask.clone(), "finding_count": finding_count,
                "finding_type": finding_type, "finding_box": finding_box, "finding_mask": finding_mask,
                "finding_size": finding_size})
    return out


def structured_records(cases_file: str | os.PathLike, schema: LabelSchema, split: str | None = "train",
                       include_priors: bool = True) -> list[dict[str, Any]]:
    """``cases.jsonl`` -> ``[{"image": absolute path, "label": labels_for_image(...), "id": ...}]`` for one split
    (None = all). Priors are separate images with their own findings."""
    from radfm3d.data.manifest import iter_jsonl
    from radfm3d.errors import RadFM3DInputError

    path = Path(cases_file)
    if not path.is_file():
        raise RadFM3DInputError(path, "cases file not found (the phantom generator writes cases.jsonl)")
    base = path.resolve().parent
    out: list[dict[str, Any]] = []
    for line_no, case in iter_jsonl(path):  # line-numbered errors: not UTF-8, invalid JSON, too deep, not an object
        if split is not None and case.get("split") != split:
            continue
        images = case.get("images") or {}
        current = images.get("dicom") or images.get("image")
        try:
            out.append({"id": case["id"], "image": str(base / current),
                        "label": labels_for_image(case, schema)})
            if include_priors and case.get("prior") and images.get("prior"):
                out.append({"id": f"{case['id']}-prior", "image": str(base / images["prior"]),
                            "label": labels_for_image(case, schema, prior=True)})
        except (KeyError, ValueError, TypeError) as err:
            raise RadFM3DInputError(path, f"line {line_no} ({case.get('id', '?')}): missing or bad field "
                                    f"{err}") from None
    if not out:
        raise RadFM3DInputError(path, f"no cases in split {split!r}")
    return out
