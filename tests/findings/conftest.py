# Copyright (c) radfm3d contributors. Apache-2.0.
"""Fixtures of the findings tests: the tiny preset, the shipped phantom schemas, and findings heads whose outputs
ignore the image (so a test knows what the reading must say)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from radfm3d.data.phantom_schemas import schema_path
from radfm3d.findings.heads import StructuredFindingsHead
from radfm3d.findings.schema import LabelSchema, load_schema
from radfm3d.modeling.configuration import RadFM3DConfig
from radfm3d.modeling.model import RadFM3DForCausalLM
from radfm3d.processing import RadFM3DProcessor

HIDDEN = 16


@pytest.fixture(scope="session")
def phantom_schema() -> LabelSchema:
    return load_schema(schema_path("phantom"))


@pytest.fixture(scope="session")
def flags_schema() -> LabelSchema:
    return load_schema(schema_path("phantom_flags"))


@pytest.fixture(scope="session")
def structures_schema() -> LabelSchema:
    return load_schema(schema_path("phantom_structures"))


@pytest.fixture
def tiny() -> tuple[RadFM3DForCausalLM, RadFM3DProcessor]:
    torch.manual_seed(0)
    model = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).eval()
    return model, RadFM3DProcessor.from_model_config("tiny")


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


@pytest.fixture
def rigged_head() -> Callable[..., dict[str, torch.Tensor]]:
    """``rig(model, schema, modality=0, region=0, findings={structure: (type, probability)}, flags={flag: p},
    finding_boxes={structure: unit box})`` -> ``head.*`` tensors of a head whose outputs ignore the image: that
    modality and region, every structure box the whole grid, the given findings (others absent) and flags."""

    def rig(model, schema: LabelSchema, modality: int = 0, region: int = 0, findings=None, flags=None,
            finding_boxes=None) -> dict[str, torch.Tensor]:
        cfg = model.config
        head = StructuredFindingsHead(cfg.vision.hidden_size, cfg.num_image_tokens, schema, HIDDEN)
        last = head.net[-1]
        bias = torch.zeros_like(last.bias)
        offset = 0
        for name, width in head._scan:
            if name == "modality":
                bias[offset + modality] = 10.0
            if name == "region":
                bias[offset + region] = 10.0
            offset += width
        names = [name for name, _ in head._structure]
        starts = {n: sum(w for m, w in head._structure[: names.index(n)]) for n in names}
        for s, structure in enumerate(schema.structures):
            base = offset + s * head.per_structure
            if "structure_box" in starts:
                b = base + starts["structure_box"]
                bias[b:b + 3], bias[b + 3:b + 6] = -10.0, 10.0
            if "finding_present" in starts:
                kind, p = (findings or {}).get(structure, (None, 0.0))
                bias[base + starts["finding_present"]] = _logit(max(min(p, 0.999), 0.001)) if kind else -10.0
                if kind:
                    bias[base + starts["finding_type"] + schema.finding_types.index(kind)] = 20.0
            if "finding_box" in starts:
                box = (finding_boxes or {}).get(structure, [0.9, 0.9, 0.9, 0.95, 0.95, 0.95])
                b = base + starts["finding_box"]
                bias[b:b + 6] = torch.logit(torch.tensor(box, dtype=torch.float32))
        offset += head.num_structures * head.per_structure
        for name, width in head._tail:
            for f, flag in enumerate(schema.flags):
                bias[offset + f] = _logit((flags or {}).get(flag, 0.001))
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(bias)
        return {f"head.{k}": v for k, v in head.state_dict().items()}

    return rig
