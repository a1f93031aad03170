# Copyright (c) radfm3d contributors. Apache-2.0.
"""Shared pytest fixtures: small synthetic volumes with known geometry (no files, no heavy deps), and a tiny
phantom set with structured labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class SyntheticVolume:
    """An int16 volume ``(X, Y, Z)`` with a voxel -> RAS mm affine and one marked (brightest) voxel."""

    array: np.ndarray
    affine: np.ndarray
    marked_ijk: tuple[int, int, int]

    @property
    def marked_world(self) -> np.ndarray:
        """World RAS mm of the marked voxel."""
        return (self.affine @ np.array([*self.marked_ijk, 1.0]))[:3]


def make_synthetic_volume(shape: tuple[int, int, int] = (32, 32, 16), spacing=(0.8, 0.9, 2.5),
                          origin=(-12.5, 30.25, -40.0), rotation_deg: float = 0.0, seed: int = 0,
                          marked_ijk: tuple[int, int, int] = (5, 20, 11)) -> SyntheticVolume:
    """CT-like HU noise in [-1000, 1000] plus a 3000 HU marker at ``marked_ijk``.

    The affine is RAS with the given spacing (mm), origin (mm) and an in-plane rotation about the
    superior axis of ``rotation_deg`` degrees (right-handed, as a scanner would write it).
    """
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    array[marked_ijk] = 3000
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return SyntheticVolume(array, affine, tuple(int(i) for i in marked_ijk))


@pytest.fixture
def synthetic_volume() -> SyntheticVolume:
    """32x32x16 int16 volume, spacing 0.8x0.9x2.5 mm, rotated 20 degrees in-plane, one marked voxel."""
    return make_synthetic_volume(rotation_deg=20.0)


@pytest.fixture(scope="session")
def structured_phantoms(tmp_path_factory) -> Path:
    """``cases.jsonl`` of 6 tiny phantoms (32x32x8 grid, NIfTI only, half with a prior scan), written once per run."""
    from radfm3d.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("structured") / "phantoms"
    generate_phantoms(root, n=6, seed=3, grid=(32, 32, 8), matrix=(32, 40), slices=(8, 10), dicom_fraction=0.0,
                      prior_fraction=0.5, progress=False)
    return root / "cases.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny-preset model folder (random weights, seed 0) with its processor; read-only for the tests using it."""
    import torch

    from radfm3d.modeling.configuration import RadFM3DConfig
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny") / "model"
    RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).save_pretrained(out)
    RadFM3DProcessor.from_model_config("tiny").save_pretrained(out)
    return out
