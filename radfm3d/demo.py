# Copyright (c) radfm3d contributors. Apache-2.0.
"""`make demo` / `python -m radfm3d.demo`: run the shipped demo bundle on its example scans.

What it does, honestly:
1. makes sure the two example scans exist (`bundles/radfm3d_demo/examples/`: a CT NIfTI and an MR DICOM series,
   RadPhantom cases from seed 2026, which the training data (seed 0) never contains);
2. prints, per scan, what the reader and the preprocessing recipe did (format, geometry, grid, intensity);
3. if the bundle holds a trained model (`models/model/config.json`), runs the bundle's `inference.json` through
   `monai.bundle` (a report, two questions and a grounding prompt per scan) and prints the answers, the boxes in
   voxel and world-mm coordinates and where the JSON / PNG files went, beside the ground truth of the phantom;
   otherwise it says so and shows the model input shapes of an untrained demo-preset model instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "radfm3d_demo"
EXAMPLE_SEED = 2026
# (file name, phantom case index, writer, grounding prompt): a CT abdomen with a liver mass, an MR chest with a
# left-lung mass; grounding prompts name their target, as in the benchmark's grounding task
EXAMPLES = (
    ("ct_abdomen.nii.gz", 10, "nifti", "<image> Locate the mass in the liver."),
    ("mr_chest_dicom", 9, "dicom", "<image> Locate the mass in the left lung."),
)
DEMO_PROMPTS = (
    "<image> Please provide the FINDINGS and IMPRESSION for this study.",
    "<image> Is this a CT or an MRI scan (and which weighting)?",
    "<image> Is this a scan of the head, chest or abdomen?",
)


def make_example_scans(folder: str | os.PathLike = BUNDLE / "examples", *, overwrite: bool = False) -> list[Path]:
    """Write the example scans (+ `<name>.truth.json` with the phantom's ground truth) if missing."""
    from radfm3d.data.phantoms import render_case
    from radfm3d.io import save_dicom_series, save_nifti
    from radfm3d.utils import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, index, writer, _ in EXAMPLES:
        path = folder / name
        paths.append(path)
        if path.exists() and not overwrite:
            continue
        scan, _, truth = render_case(EXAMPLE_SEED, index, with_prior=False)
        image = scan.to_metatensor()
        if writer == "nifti":
            save_nifti(image, path)
        else:
            save_dicom_series(image, path, modality="MR" if truth["modality"] != "CT" else "CT",
                              series_uid=f"1.2.826.0.1.3680043.10.1{index:03d}.{EXAMPLE_SEED}",
                              description=f"RadPhantom example {EXAMPLE_SEED}/{index}")
        atomic_write_json(folder / f"{name}.truth.json", _truth_summary(truth), indent=2)
    return paths


def _truth_summary(truth: dict[str, Any]) -> dict[str, Any]:
    keep = ("type", "organ", "side", "size_mm", "centre_world_mm", "box_world_mm")
    return {"modality": truth.get("modality"), "sequence": truth.get("sequence"), "region": truth.get("region"),
            "findings": [{k: f.get(k) for k in keep if k in f} for f in truth.get("findings", [])]}


def describe_scan(path: Path, recipe: Any) -> str:
    """One paragraph: what load_image read and what the recipe made of it."""
    import nibabel as nib
    import numpy as np

    from radfm3d.io import load_image
    from radfm3d.transforms import preprocess

    t0 = time.perf_counter()
    image = load_image(path)
    t1 = time.perf_counter()
    grid = preprocess(image, recipe)
    t2 = time.perf_counter()
    meta = image.meta
    codes = "".join(nib.aff2axcodes(np.asarray(meta["original_affine"])))
    spacing = "x".join(f"{s:.2f}" for s in meta["original_spacing"])
    return (f"  read   : {meta['source_format']}, {meta['modality']}, shape {tuple(meta['original_shape'])}, "
            f"spacing {spacing} mm, orientation {codes} ({1000 * (t1 - t0):.0f} ms)\n"
            f"  recipe : -> RAS grid {tuple(grid.shape[1:])}, {grid.shape[0]} channels in "
            f"[{float(grid.min()):.2f}, {float(grid.max()):.2f}] ({1000 * (t2 - t1):.0f} ms)")


def _run_bundle_inference(model_dir: Path, scan: Path, prompts: list[str], output_dir: Path) -> None:
    """The bundle's own `inference.json` (as `python -m monai.bundle run` would run it) on one scan."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer",
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE), model_dir=str(model_dir), dataset_dir=str(scan.parent), scans=[str(scan)],
        output_dir=str(output_dir), prompts=prompts, max_new_tokens=96,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def _print_truth(output_dir: Path, examples: Path) -> None:
    """After the bundle's own printout of each answer: the files written and the phantom's ground truth."""
    for result_file in sorted(output_dir.glob("*.json")):
        result = json.loads(result_file.read_text())
        if not isinstance(result, dict) or "answers" not in result:  # failures.json, not a scan's result
            continue
        scan = Path(str(result.get("scan", "")))
        print(f"\n{scan.name}: json {result_file}" + (f", figure {result['png']}" if result.get("png") else ""))
        truth_file = examples / f"{scan.name}.truth.json"
        if truth_file.is_file():
            print(f"  ground truth: {json.dumps(json.loads(truth_file.read_text()))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radfm3d.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(BUNDLE / "models" / "model"))
    parser.add_argument("--output-dir", default=str(BUNDLE / "outputs"))
    args = parser.parse_args(argv)

    from radfm3d.transforms import PreprocessingRecipe

    examples = BUNDLE / "examples"
    scans = make_example_scans(examples)
    model_dir = Path(args.model_dir)
    trained = (model_dir / "config.json").is_file()
    recipe = PreprocessingRecipe.load(model_dir) if (model_dir / "preprocessing.json").is_file() \
        else PreprocessingRecipe()
    print(f"radfm3d demo — bundle {BUNDLE.relative_to(Path.cwd()) if BUNDLE.is_relative_to(Path.cwd()) else BUNDLE}")
    for scan in scans:
        print(f"\n{scan.name}\n{describe_scan(scan, recipe)}")
    if trained:
        print(f"\nRunning the bundle's inference.json with the trained model in {model_dir} ...", flush=True)
        t0 = time.perf_counter()
        for scan, (_, _, _, grounding) in zip(scans, EXAMPLES):
            _run_bundle_inference(model_dir, scan, [*DEMO_PROMPTS, grounding], Path(args.output_dir))
        print(f"(inference took {time.perf_counter() - t0:.1f} s)")
        _print_truth(Path(args.output_dir), examples)
        return 0

    print(f"\nNo trained model in {model_dir}: this is NOT a trained model's output. Showing the model inputs that "
          "an untrained demo-preset model (SmolLM2-135M-Instruct base) receives:")
    import torch

    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    model = RadFM3DForCausalLM.from_pretrained("demo")
    processor = RadFM3DProcessor.from_model_config(model.config, recipe=recipe)
    inputs = processor(text=[DEMO_PROMPTS[1]], images=[[str(scans[0])]])
    with torch.no_grad():
        tokens = model.get_image_features(inputs["pixel_values"], inputs.get("image_mask"))
    print(f"  input_ids {tuple(inputs['input_ids'].shape)}, pixel_values {tuple(inputs['pixel_values'].shape)}, "
          f"visual tokens {tuple(tokens.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
