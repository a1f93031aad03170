# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d import radgenome-chestct``: RadGenome-ChestCT's region-grounded report sentences -> structure records.

Layout read (the dataset card's; ``--root`` holds ``dataset/`` or is ``dataset`` itself)::

    dataset/{train,valid}_preprocessed/<split>_<patient>/<...>/<volume>.nii.gz          the CT volumes
    dataset/{train,valid}_region_mask/seg_<volume stem>/<region>.nii.gz                 one mask per region
    dataset/radgenome_files/{train,validation}_region_report.csv   Volumename, Anatomy, Sentence (one row per
                                                                   sentence; an empty Anatomy = whole report)

Regions: abdomen, bone, breast, esophagus, heart, lung, mediastinum, pleura, thyroid, trachea and bronchie (the
mask file names; any other name found is imported as it is). Per volume: a ``report`` record (the whole-report
sentence, else the region sentences joined), and per region sentence a ``region_report`` record ("Describe the
heart ...") whose ``ground_truth`` carries the structure, its mask path and its box in world RAS mm (from the mask's
non-zero voxels and the mask's own affine). With a preprocessing recipe (``--recipe``: a model folder or
``preprocessing.json``) each region also gets a ``grounding`` record whose answer is the box as 0-99 text on that
recipe's model grid. Masks are read (voxels), volumes only by header; per-volume results are resumable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radfm3d.data.importers.common import (ImportReport, ItemState, check_out_dir, parse_splits, relative_image_path,
                                           write_split_manifests)
from radfm3d.data.importers.table_index import TableIndex
from radfm3d.errors import RadFM3DInputError
from radfm3d.utils import progress_bar

__all__ = ["RADGENOME_REGIONS", "import_radgenome", "mask_box", "cli"]

RADGENOME_REGIONS = ("abdomen", "bone", "breast", "esophagus", "heart", "lung", "mediastinum", "pleura", "thyroid",
                     "trachea and bronchie")
_REPORT_PREFIX = {"train": ("train",), "valid": ("validation", "valid")}


def _dataset_dir(root: Path) -> Path:
    for candidate in (root / "dataset", root):
        if (candidate / "radgenome_files").is_dir():
            return candidate
    raise RadFM3DInputError(root, "not a RadGenome-ChestCT folder: expected dataset/radgenome_files below it")


def _volume_index(folder: Path) -> dict[str, Path]:
    """Volume file name -> path, for every ``.nii.gz`` below the split's preprocessed folder."""
    found: dict[str, Path] = {}
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.endswith(".nii.gz"):
                found.setdefault(name, Path(dirpath) / name)
    return found


def mask_box(mask_path: Path) -> dict[str, Any] | None:
    """The mask's non-zero voxels as a box: voxel bounds, world RAS mm corners, the mask's affine and shape.

    None when the mask is empty. Voxel boxes cover whole voxels: ``(lo - 0.5, hi + 0.5)`` in index units.
    """
    from radfm3d.io import load_image

    mask = load_image(mask_path)
    values = np.asarray(mask[0])
    nonzero = np.nonzero(values > 0.5)
    if not len(nonzero[0]):
        return None
    lo = [int(a.min()) for a in nonzero]
    hi = [int(a.max()) for a in nonzero]
    affine = np.asarray(mask.affine, dtype=np.float64)
    corners = np.array([[x, y, z, 1.0] for x in (lo[0] - 0.5, hi[0] + 0.5) for y in (lo[1] - 0.5, hi[1] + 0.5)
                        for z in (lo[2] - 0.5, hi[2] + 0.5)])
    world = (affine @ corners.T).T[:, :3]
    return {"box_voxel": lo + hi, "box_world_mm": [round(float(v), 3) for v in (*world.min(0), *world.max(0))],
            "voxels": int(len(nonzero[0])), "shape": list(values.shape), "affine": affine.tolist()}


def import_radgenome(root: str | os.PathLike, out: str | os.PathLike, *, splits: Sequence[str] = ("train", "valid"),
                     recipe: Any = None, progress: bool = True) -> ImportReport:
    """Import RadGenome-ChestCT; writes ``train.jsonl`` / ``valid.jsonl`` and the import report.

    Args:
        recipe: a :class:`~radfm3d.transforms.PreprocessingRecipe` (or a path to one) for grounding answers on the
            model grid; None writes no grounding records.
    """
    from radfm3d.text.boxes import format_box, grid_box_to_normalised
    from radfm3d.transforms import PreprocessingRecipe, compute_grid_geometry

    dataset, out_dir = _dataset_dir(Path(root)), check_out_dir(out)
    if recipe is not None and not isinstance(recipe, PreprocessingRecipe):
        recipe = PreprocessingRecipe.load(recipe)
    report = ImportReport("radgenome-chestct", dataset, {"splits": list(splits),
                                                         "recipe": recipe.to_dict() if recipe else None})
    if recipe is None:
        report.note("--recipe", "no preprocessing recipe given: no grounding records (boxes stay in world mm in "
                                "each region record's ground truth)")
    index = TableIndex(out_dir / ".import_state" / "radgenome_tables.sqlite")
    state = ItemState(out_dir, "radgenome_volumes")
    per_region: dict[str, int] = {}

    def volume_records(split: str, name: str, rows: list[tuple[int, Mapping[str, Any]]], volume: Path
                       ) -> dict[str, Any]:
        stem = name[: -len(".nii.gz")]
        mask_dir = dataset / f"{split}_region_mask" / f"seg_{stem}"
        image = relative_image_path(volume, out_dir)
        parts = stem.split("_")
        base = {"images": [image], "modality": "CT", "region": "chest",
                "patient_id": "_".join(parts[:2]), "study_id": "_".join(parts[:3]),
                "source": {"dataset": "RadGenome-ChestCT", "volume": name}}
        whole = [r["Sentence"].strip() for _, r in rows if not (r.get("Anatomy") or "").strip()
                 and (r.get("Sentence") or "").strip()]
        regional = [(n, r["Anatomy"].strip(), r["Sentence"].strip()) for n, r in rows
                    if (r.get("Anatomy") or "").strip() and (r.get("Sentence") or "").strip()]
        made: list[dict[str, Any]] = []
        problems: list[str] = []
        answer = " ".join(whole) if whole else " ".join(s for _, _, s in regional)
        if answer:
            made.append({**base, "id": f"{name}-report", "task": "report", "answer": answer,
                         "prompt": "<image> Write the findings of this chest CT report."})
        geometry = None
        for row_number, region, sentence in regional:
            mask_path = mask_dir / f"{region}.nii.gz"
            rid = f"{name}-{region.replace(' ', '_')}"
            if not mask_path.is_file():
                problems.append(f"row {row_number}: no mask {mask_path.relative_to(dataset)}")
                continue
            try:
                box = mask_box(mask_path)
            except RadFM3DInputError as err:
                problems.append(f"row {row_number}: mask unreadable ({err.problem})")
                continue
            if box is None:
                problems.append(f"row {row_number}: mask {region} is empty")
                continue
            truth = {"structure": region, "mask": relative_image_path(mask_path, out_dir),
                     "box_world_mm": box["box_world_mm"], "box_voxel": box["box_voxel"]}
            made.append({**base, "id": f"{rid}-report", "task": "region_report", "answer": sentence,
                         "prompt": f"<image> Describe the {region} in this chest CT.", "ground_truth": truth})
            if recipe is not None:
                if geometry is None:
                    geometry = compute_grid_geometry(np.asarray(box["affine"]), box["shape"], recipe)
                grid = geometry.box_world_to_grid(box["box_world_mm"])
                text = format_box(grid_box_to_normalised(grid, recipe.spatial_size))
                made.append({**base, "id": f"{rid}-grounding", "task": "grounding", "answer": text,
                             "prompt": f"<image> Where is the {region}? Answer with a box.",
                             "ground_truth": {**truth, "boxes_world_mm": [box["box_world_mm"]]}})
        return {"records": made, "problems": problems}

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for split in splits:
            if split not in _REPORT_PREFIX:
                raise ValueError(f"unknown RadGenome split {split!r} (train or valid)")
            csv_path = next((dataset / "radgenome_files" / f"{p}_region_report.csv" for p in _REPORT_PREFIX[split]
                             if (dataset / "radgenome_files" / f"{p}_region_report.csv").is_file()), None)
            if csv_path is None:
                raise RadFM3DInputError(dataset / "radgenome_files", f"no {split} region report CSV")
            index.load(f"{split}_region_report", csv_path, "Volumename", grouped=True)
            volumes = _volume_index(dataset / f"{split}_preprocessed")
            bar = progress_bar(index.count_groups(f"{split}_region_report"), enabled=progress,
                               desc=f"RadGenome {split}", unit="volume")
            try:
                for name, rows in index.groups(f"{split}_region_report"):
                    bar.update(1)
                    where = f"{csv_path.name}:row {rows[0][0]}"
                    volume = volumes.get(name)
                    if volume is None:
                        report.skip(where, f"volume {name} not found under {split}_preprocessed")
                        continue
                    st = volume.stat()
                    key = f"{name}|{st.st_size}|{st.st_mtime_ns}|{len(rows)}|{recipe.to_json() if recipe else ''}"
                    done = state.get(key)
                    if done is None:
                        done = volume_records(split, name, rows, volume)
                        state.put(key, done)
                    for problem in done["problems"]:
                        report.skip(f"{csv_path.name} ({name})", problem)
                    for record in done["records"]:
                        if record["task"] == "region_report":
                            region = record["ground_truth"]["structure"]
                            per_region[region] = per_region.get(region, 0) + 1
                        yield split, record
            finally:
                bar.close()

    try:
        write_split_manifests(records(), out_dir, report)
    finally:
        state.close()
        index.close()
    report.extra["region_sentences_with_masks"] = dict(sorted(per_region.items()))
    report.write(out_dir)
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d import radgenome-chestct --root RadGenome-ChestCT --out DIR [--recipe MODEL]``."""
    parser = argparse.ArgumentParser(prog="radfm3d import radgenome-chestct", description=(
        "Import RadGenome-ChestCT: region-grounded report sentences with their masks -> structure-level records "
        "(sentence + box in world mm) and, with --recipe, grounding records on that model grid. Resumable."))
    parser.add_argument("--root", required=True, help="the downloaded dataset (holding dataset/)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="train,valid", help="splits to import (default train,valid)")
    parser.add_argument("--recipe", default=None,
                        help="a model folder or preprocessing.json: grounding answers on its grid (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    splits = parse_splits(parser, args.split, _REPORT_PREFIX, "RadGenome-ChestCT")
    report = import_radgenome(args.root, args.out, splits=splits, recipe=args.recipe, progress=not args.no_progress)
    print(f"radfm3d import radgenome-chestct: {report.summary_line()}; report: {Path(args.out) / 'report.md'}",
          file=sys.stderr)
    return 0
