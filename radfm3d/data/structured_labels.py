# Copyright (c) radfm3d contributors. Apache-2.0.
"""Structured labels of a scan (modality, region, per-structure boxes and findings) as fixed-size tensors.

They drive the vision pre-training stage (:mod:`radfm3d.engine.pretraining`): before the LLM ever sees a visual
token, the encoder and resampler learn to carry *what* is in the scan and *where*, which the language loss alone
teaches far too slowly (our first CPU run through the LLM only ended with image-independent visual tokens).

Input is the phantom benchmark's ``cases.jsonl`` (one case per line; see ``PHANTOM_BENCHMARK.md``): ``modality``,
``sequence``, ``region``, ``organs`` (``structure``, ``organ``, ``side``, ``box_grid``) and ``findings`` (``type``,
``organ``, ``side``, ``size_mm``, ``box_grid``), plus ``prior`` (its own ``findings``) and ``grid_geometry``. A user
with segmentations can write the same fields for their own scans.

Per image (``S`` = :data:`STRUCTURES`, boxes are ``(x0, y0, z0, x1, y1, z1)`` on the model grid divided by the grid
size, so in [0, 1] like the 0-99 box text):

==================== ============ ===========================================================
key                  shape/dtype  meaning (-100 / mask 0 = not supervised)
==================== ============ ===========================================================
modality             () long      0 CT, 1 MRI T1, 2 MRI T2
region               () long      0 head, 1 chest, 2 abdomen
total_count          () long      number of findings, capped at 3
structure_present    (S,) float   structure is in this scan's region
structure_box        (S, 6) float structure box (mask ``structure_box_mask``)
finding_present      (S,) float   the structure holds a finding (mask = ``structure_present``)
finding_count        (S,) long    findings in the structure, capped at 3 (-100 outside the region)
finding_type         (S,) long    type of its largest finding (index in FINDING_TYPES; -100 when none)
finding_box          (S, 6) float box of its largest finding (mask ``finding_mask``)
finding_size         (S,) float   log(longest diameter / 10 mm) of the largest finding (mask ``finding_mask``)
findings_box         (F, 6) float every finding's box, F = MAX_FINDINGS slots (zeros when unused)
findings_type        (F,) long    every finding's type (-100 on unused slots); drives the per-patch objective
==================== ============ ===========================================================
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from radfm3d.data.phantoms import _ANATOMY, FINDING_SITES, FINDING_TYPES, REGION_FINDING_ORGANS, REGIONS, organ_label

__all__ = ["STRUCTURES", "MODALITY_CLASSES", "labels_for_image", "structured_records", "MAX_COUNT", "MAX_FINDINGS",
           "LabelSchema", "PHANTOM_LABEL_SCHEMA"]

#: every named structure of the phantom anatomy, in a fixed order (13)
STRUCTURES: tuple[str, ...] = tuple(dict.fromkeys(s for region in REGIONS for s, organ, *_ in _ANATOMY[region] if organ))
#: (organ, side) -> structure name
_STRUCTURE_OF: dict[tuple[str, str], str] = {
    (organ, side): s for region in REGIONS for s, organ, side, *_ in _ANATOMY[region] if organ}
_REGION_STRUCTURES: dict[str, set[str]] = {
    region: {s for s, organ, *_ in _ANATOMY[region] if organ} for region in REGIONS}
MODALITY_CLASSES: tuple[str, ...] = ("CT", "T1", "T2")


@dataclass(frozen=True)
class LabelSchema:
    """The label space of the vision pre-training heads, in the words a findings prompt writes.

    Index order is the heads' output order: ``modality_names`` (one per modality class, as written in a reading),
    ``regions``, ``structures`` (the per-structure head rows), ``finding_types``. ``structure_names`` maps a structure
    to its words ("left kidney"); ``finding_sites`` maps each region to its ``(structure, finding types)`` sites in the
    order a reading lists them. :data:`PHANTOM_LABEL_SCHEMA` is the phantom benchmark's; a user with their own
    segmentation labels builds one of these and passes it to
    :func:`radfm3d.modeling.findings_prompt.build_findings_prompt_config`.
    """

    modality_names: tuple[str, ...]
    regions: tuple[str, ...]
    structures: tuple[str, ...]
    structure_names: Mapping[str, str]
    finding_types: tuple[str, ...]
    finding_sites: Mapping[str, tuple[tuple[str, tuple[str, ...]], ...]]

    def __post_init__(self) -> None:
        for name in ("modality_names", "regions", "structures", "finding_types"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"LabelSchema.{name} must be a non-empty list of distinct names, got {values!r}")
        if set(self.finding_sites) != set(self.regions):
            raise ValueError(f"LabelSchema.finding_sites must have one entry per region {self.regions}, "
                             f"got {sorted(self.finding_sites)}")
        for region, sites in self.finding_sites.items():
            for structure, types in sites:
                if structure not in self.structures:
                    raise ValueError(f"finding site {structure!r} of region {region!r} is not one of the structures")
                unknown = [t for t in types if t not in self.finding_types]
                if not types or unknown:
                    raise ValueError(f"finding site {structure!r} of region {region!r}: finding types {types!r} "
                                     f"must be non-empty and among {self.finding_types}")
        missing = [s for s in self.structures if s not in self.structure_names]
        if missing:
            raise ValueError(f"LabelSchema.structure_names lacks {missing}")


#: the phantom benchmark's label schema (what the shipped demo model's heads and findings prompt use)
PHANTOM_LABEL_SCHEMA = LabelSchema(
    modality_names=("CT", "MRI T1-weighted", "MRI T2-weighted"),  # MODALITY_CLASSES order
    regions=tuple(REGIONS),
    structures=STRUCTURES,
    structure_names={s: organ_label(organ, side) for (organ, side), s in _STRUCTURE_OF.items()},
    finding_types=tuple(FINDING_TYPES),
    finding_sites={region: tuple((_STRUCTURE_OF[(organ, side)], tuple(FINDING_SITES[organ]))
                                 for organ, side in REGION_FINDING_ORGANS[region]) for region in REGIONS},
)
MAX_COUNT = 3
MAX_FINDINGS = 4
IGNORE = -100


def _modality_class(modality: str, sequence: str | None) -> int:
    key = "CT" if str(modality).upper() == "CT" else str(sequence or "").upper()
    if key not in MODALITY_CLASSES:
        raise ValueError(f"unknown modality/sequence {modality!r}/{sequence!r}; expected CT, MR T1 or MR T2")
    return MODALITY_CLASSES.index(key)


def _unit_box(box_grid: Sequence[float], spatial_size: Sequence[int]) -> list[float]:
    size = [float(s) for s in spatial_size] * 2
    return [min(1.0, max(0.0, float(v) / s)) for v, s in zip(box_grid, size)]


def labels_for_image(case: Mapping[str, Any], prior: bool = False) -> dict[str, torch.Tensor]:
    """The structured labels (see the module table) of a case's current scan, or of its prior (``prior=True``;
    structure boxes are then unsupervised, since the case lists organ boxes on the current grid only)."""
    n = len(STRUCTURES)
    source = case["prior"] if prior else case
    spatial_size = source["grid_geometry"]["spatial_size"]
    present = torch.zeros(n)
    for s in _REGION_STRUCTURES[case["region"]]:
        present[STRUCTURES.index(s)] = 1.0
    structure_box = torch.zeros(n, 6)
    structure_box_mask = torch.zeros(n)
    if not prior:
        for organ in case.get("organs", []):
            i = STRUCTURES.index(organ["structure"])
            structure_box[i] = torch.tensor(_unit_box(organ["box_grid"], spatial_size))
            structure_box_mask[i] = 1.0
    finding_count = torch.where(present > 0, 0, IGNORE).long()
    finding_type = torch.full((n,), IGNORE, dtype=torch.long)
    finding_box = torch.zeros(n, 6)
    finding_size = torch.zeros(n)
    largest = torch.zeros(n)
    findings = source.get("findings", [])
    for f in findings:
        i = STRUCTURES.index(_STRUCTURE_OF[(f["organ"], f["side"])])
        finding_count[i] = min(MAX_COUNT, int(finding_count[i]) + 1)
        if float(f["size_mm"]) > largest[i]:
            largest[i] = float(f["size_mm"])
            finding_type[i] = FINDING_TYPES.index(f["type"])
            finding_box[i] = torch.tensor(_unit_box(f["box_grid"], spatial_size))
            finding_size[i] = math.log(float(f["size_mm"]) / 10.0)
    finding_mask = (largest > 0).float()
    findings_box = torch.zeros(MAX_FINDINGS, 6)
    findings_type = torch.full((MAX_FINDINGS,), IGNORE, dtype=torch.long)
    for slot, f in enumerate(sorted(findings, key=lambda g: -float(g["size_mm"]))[:MAX_FINDINGS]):
        findings_box[slot] = torch.tensor(_unit_box(f["box_grid"], spatial_size))
        findings_type[slot] = FINDING_TYPES.index(f["type"])
    return {
        "modality": torch.tensor(_modality_class(case["modality"], case.get("sequence"))),
        "region": torch.tensor(REGIONS.index(case["region"])),
        "total_count": torch.tensor(min(MAX_COUNT, len(findings))),
        "structure_present": present,
        "structure_box": structure_box,
        "structure_box_mask": structure_box_mask,
        "finding_present": finding_mask.clone(),
        "finding_count": finding_count,
        "finding_type": finding_type,
        "finding_box": finding_box,
        "finding_mask": finding_mask,
        "finding_size": finding_size,
        "findings_box": findings_box,
        "findings_type": findings_type,
    }


def structured_records(cases_file: str | os.PathLike, split: str | None = "train",
                       include_priors: bool = True) -> list[dict[str, Any]]:
    """``cases.jsonl`` -> ``[{"image": absolute path, "label": labels_for_image(...), "id": ...}]`` for one split
    (None = all). Priors are separate images with their own findings."""
    from radfm3d.errors import RadFM3DInputError

    path = Path(cases_file)
    if not path.is_file():
        raise RadFM3DInputError(path, "cases file not found (the phantom generator writes cases.jsonl)")
    base = path.resolve().parent
    out: list[dict[str, Any]] = []
    with path.open() as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                case = json.loads(line)
            except json.JSONDecodeError as err:
                raise RadFM3DInputError(path, f"line {line_no} is not JSON ({err.msg})") from None
            if split is not None and case.get("split") != split:
                continue
            images = case.get("images") or {}
            current = images.get("dicom") or images.get("image")
            try:
                out.append({"id": case["id"], "image": str(base / current), "label": labels_for_image(case)})
                if include_priors and case.get("prior") and images.get("prior"):
                    out.append({"id": f"{case['id']}-prior", "image": str(base / images["prior"]),
                                "label": labels_for_image(case, prior=True)})
            except (KeyError, ValueError, TypeError) as err:
                raise RadFM3DInputError(path, f"line {line_no} ({case.get('id', '?')}): missing or bad field "
                                        f"{err}") from None
    if not out:
        raise RadFM3DInputError(path, f"no cases in split {split!r}")
    return out
