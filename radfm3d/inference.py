# Copyright (c) radfm3d contributors. Apache-2.0.
"""Bundle inference: scans (NIfTI / NRRD / MHA / DICOM folder) + prompts -> one JSON (and one PNG) per scan.

Each JSON holds, per prompt, the generated text and any boxes in model-grid 0-99 steps, original voxel indices
and world RAS mm; plus timings, the model folder and the preprocessing recipe used. A MONAI ``SupervisedEvaluator``
runs it (``bundles/radfm3d_demo/configs/inference.json``); :func:`run_inference` is the same from Python.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from radfm3d.errors import RadFM3DInputError

__all__ = [
    "SCAN_SUFFIXES",
    "TASK_PROMPTS",
    "default_prompts",
    "prompt_list",
    "find_scans",
    "ScanDataset",
    "ScanPromptsCollate",
    "ScanResultWriter",
    "boxes_in_text",
    "draw_boxes_png",
    "run_inference",
]

logger = logging.getLogger(__name__)

SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


# --------------------------------------------------------------------------------------------- prompts
#: task shortcut -> prompt, in the phrasing of the RadPhantom benchmark the demo model is trained on
TASK_PROMPTS: dict[str, str] = {
    "report": "<image> Please provide the FINDINGS and IMPRESSION for this study.",
    "modality": "<image> Is this a CT or an MRI scan (and which weighting)?",
    "region": "<image> Is this a scan of the head, chest or abdomen?",
    "findings": "<image> How many focal lesions are there?",
}


def default_prompts() -> list[str]:
    """Report, modality and region prompts (:data:`TASK_PROMPTS`)."""
    return [TASK_PROMPTS["report"], TASK_PROMPTS["modality"], TASK_PROMPTS["region"]]


def prompt_list(prompt: str | Sequence[str] | None = None, prompts: Sequence[str] | None = None) -> list[str]:
    """The prompts to run: ``prompt`` (one text or a list, e.g. from ``--prompt``) else ``prompts`` else the defaults.

    A task shortcut ("report", "modality", "region", "findings") becomes its :data:`TASK_PROMPTS` text; any other
    text is used as written, with an ``<image>`` placeholder put in front when it has none (e.g. "Locate the
    spleen." -> "<image> Locate the spleen.").
    """
    from radfm3d.text.prompts import IMAGE_PLACEHOLDER, count_images

    if prompt:
        chosen = [prompt] if isinstance(prompt, str) else list(prompt)
    elif prompts:
        chosen = list(prompts)
    else:
        return default_prompts()
    out = []
    for text in chosen:
        text = str(text).strip()
        if not text:
            raise RadFM3DInputError("prompt", "empty prompt")
        if text.lower() in TASK_PROMPTS:
            out.append(TASK_PROMPTS[text.lower()])
        else:
            out.append(text if count_images(text) else f"{IMAGE_PLACEHOLDER} {text}")
    return out


# ----------------------------------------------------------------------------------------------- scans
def _is_scan_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in SCAN_SUFFIXES)


def _is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    for f in sorted(path.iterdir())[:20]:
        if f.is_file():
            if f.suffix.lower() == ".dcm":
                return True
            try:
                with f.open("rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def find_scans(dataset_dir: str | os.PathLike | None = None, scans: Sequence[str] | str | None = None) -> list[str]:
    """Scan paths: ``scans`` (files or DICOM folders) if given, else every scan file and DICOM-series folder found
    directly in ``dataset_dir`` (or ``dataset_dir`` itself when it is a scan file or a DICOM folder)."""
    if scans:
        items = [scans] if isinstance(scans, (str, os.PathLike)) else list(scans)
        paths = [Path(s) for s in items]
        for p in paths:
            if not p.exists():
                raise RadFM3DInputError(p, "scan not found")
        return [str(p) for p in paths]
    if dataset_dir is None:
        raise RadFM3DInputError("inference", "give --dataset_dir (a folder of scans) or --scans")
    root = Path(dataset_dir)
    if not root.exists():
        raise RadFM3DInputError(root, "dataset_dir not found")
    if root.is_file() or _is_dicom_folder(root):
        return [str(root)]
    found = [p for p in sorted(root.iterdir()) if (p.is_file() and _is_scan_file(p)) or _is_dicom_folder(p)]
    if not found:
        raise RadFM3DInputError(root, f"no scans ({', '.join(SCAN_SUFFIXES)} files or DICOM-series folders) inside")
    return [str(p) for p in found]


class ScanDataset(torch.utils.data.Dataset):
    """Items ``{"scan": path, "prompts": [...]}``, one per scan; every scan gets the same prompts."""

    def __init__(self, dataset_dir: str | os.PathLike | None = None, scans: Sequence[str] | str | None = None,
                 prompts: Sequence[str] | None = None) -> None:
        self.scans = find_scans(dataset_dir, scans)
        self.prompts = list(prompts) if prompts else default_prompts()
        self.data = [{"scan": s, "prompts": self.prompts} for s in self.scans]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.data[index]


class ScanPromptsCollate:
    """One scan + its prompts -> a left-padded batch of P prompts on the same (once-read) image.

    Adds ``scan``, ``prompts``, ``grid_geometry`` (dict), ``image`` (the original MetaTensor, for drawing) and
    ``timings_s`` (``load``, ``preprocess``) to the model inputs.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(items) != 1:
            raise ValueError("ScanPromptsCollate takes one scan per batch (batch_size=1)")
        from radfm3d.io import load_image

        item = items[0]
        t0 = time.perf_counter()
        image = load_image(item["scan"])
        t1 = time.perf_counter()
        prompts = list(item["prompts"])
        feats = self.processor(text=prompts, images=[[image] for _ in prompts], return_tensors="pt",
                               padding_side="left")
        t2 = time.perf_counter()
        batch = {k: feats[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask") if k in feats}
        geoms = feats.get("grid_geometry") if hasattr(feats, "get") else None
        batch.update({"scan": item["scan"], "prompts": prompts, "image": image,
                      "grid_geometry": geoms[0][0] if geoms and geoms[0] else None,
                      "timings_s": {"load": t1 - t0, "preprocess": t2 - t1}})
        return batch


# ----------------------------------------------------------------------------------------------- boxes
def boxes_in_text(text: str, grid_geometry: Mapping[str, Any] | Any | None) -> list[dict[str, Any]]:
    """``<box>..</box>`` in ``text`` placed on the scan (:func:`radfm3d.text.postprocess.boxes_from_text`:
    ``box_0_99``, ``box_grid``, ``box_voxel``, ``box_world_mm``, centres, ``size_mm``); without a geometry only
    ``box_0_99``."""
    from radfm3d.text.boxes import parse_boxes
    from radfm3d.text.postprocess import boxes_from_text

    if grid_geometry is None:
        return [{"box_0_99": [int(v) for v in b]} for b in parse_boxes(text)]
    return boxes_from_text(text, grid_geometry)


def draw_boxes_png(image: Any, boxes_voxel: Sequence[Sequence[float]], path: str | os.PathLike,
                   title: str = "") -> Path:
    """Three orthogonal slices of the original volume through the first box's centre with every box drawn
    (voxel index space; channel 0; display window = 1st-99th percentile)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    vol = np.asarray(image[0] if np.ndim(image) == 4 else image, dtype=np.float32)
    lo, hi = np.percentile(vol, [1, 99])
    boxes = np.asarray(boxes_voxel, dtype=np.float64).reshape(-1, 6)
    centre = np.clip(((boxes[0, :3] + boxes[0, 3:]) / 2).round().astype(int), 0, np.array(vol.shape) - 1)
    views = [("axial (z = %d)" % centre[2], vol[:, :, centre[2]], (0, 1)),
             ("coronal (y = %d)" % centre[1], vol[:, centre[1], :], (0, 2)),
             ("sagittal (x = %d)" % centre[0], vol[centre[0], :, :], (1, 2))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, (name, plane, (a, b)) in zip(axes, views):
        ax.imshow(plane.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect="auto")
        for box in boxes:
            ax.add_patch(mpatches.Rectangle((box[a] - 0.5, box[b] - 0.5), box[a + 3] - box[a] + 1,
                                            box[b + 3] - box[b] + 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"voxel axis {a}")
        ax.set_ylabel(f"voxel axis {b}")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- writer
class ScanResultWriter:
    """Handler: writes ``<output_dir>/<scan name>.json`` (and ``.png`` when a box was found) per scan.

    Reads the batch of :class:`ScanPromptsCollate` and ``engine.state.output["pred"]`` (texts, one per prompt).
    """

    def __init__(self, output_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 processor: Any = None, draw: bool = True, print_results: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.processor = processor
        self.draw, self.print_results = bool(draw), bool(print_results)
        self.written: list[Path] = []
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _recipe(self) -> dict[str, Any] | None:
        recipe = getattr(self.processor, "recipe", None)
        return recipe.to_dict() if hasattr(recipe, "to_dict") else None

    @staticmethod
    def _reading(engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any] | None:
        """The findings reader's reading of the scan (what the LLM was told the encoder sees), None without one;
        the findings model reuses the encoder pass of the generation on the same images."""
        from radfm3d.engine.training import unwrap_model

        model = unwrap_model(engine.network)
        pixels = batch.get("pixel_values")
        if getattr(model, "reader", None) is None or pixels is None:
            return None
        with torch.no_grad():
            rows = model.read_findings(torch.as_tensor(pixels[:1]).to(engine.state.device),
                                       None if batch.get("image_mask") is None else batch["image_mask"][:1])
        return rows[0][0] if rows and rows[0] else None

    @staticmethod
    def _snaps_boxes(engine: Engine) -> bool:
        """Whether the model moves the LLM's boxes onto its heads' finding boxes (:mod:`radfm3d.findings.box_snapping`),
        so a reader of the JSON knows where a box came from."""
        from radfm3d.engine.training import unwrap_model

        reader = getattr(unwrap_model(engine.network), "reader", None)
        return bool(reader is not None and reader.snaps_boxes)

    def write(self, engine: Engine) -> Path:
        batch, texts = engine.state.batch, list(engine.state.output["pred"])
        generate_s = time.perf_counter() - self._t0
        scan = Path(batch["scan"])
        geometry = batch.get("grid_geometry")
        image = batch.get("image")
        answers = [{"prompt": p, "text": t, "boxes": boxes_in_text(t, geometry)}
                   for p, t in zip(batch["prompts"], texts)]
        name = scan.name
        for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        result: dict[str, Any] = {
            "scan": str(scan),
            "source_format": (getattr(image, "meta", {}) or {}).get("source_format"),
            "modality_in_file": (getattr(image, "meta", {}) or {}).get("modality"),
            "model": self.model_dir,
            "recipe": self._recipe(),
            "grid_geometry": geometry,
            "image_reading": self._reading(engine, batch),
            "box_snapping": self._snaps_boxes(engine),
            "answers": answers,
            "timings_s": {**{k: round(float(v), 4) for k, v in batch.get("timings_s", {}).items()},
                          "generate": round(generate_s, 4)},
        }
        voxel_boxes = [b["box_voxel"] for a in answers for b in a["boxes"] if "box_voxel" in b]
        if self.draw and voxel_boxes and image is not None:
            png = draw_boxes_png(image, voxel_boxes, self.output_dir / f"{name}.png", title=scan.name)
            result["png"] = str(png)
        path = self.output_dir / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        os.replace(tmp, path)
        self.written.append(path)
        if self.print_results:
            lines = [f"== {scan} -> {path}"]
            if result["image_reading"]:
                lines.append(f"  ({result['image_reading']['text']})")
            for a in answers:
                lines.append(f"  Q: {a['prompt']}\n  A: {a['text']}")
                for b in a["boxes"]:
                    if "box_world_mm" in b:
                        lines.append(f"     box voxel {np.round(b['box_voxel'], 1).tolist()} "
                                     f"world mm {np.round(b['box_world_mm'], 1).tolist()}")
            print("\n".join(lines), flush=True)
        return path


# ----------------------------------------------------------------------------------------------- API
def run_inference(
    model_dir: str | os.PathLike, output_dir: str | os.PathLike, dataset_dir: str | os.PathLike | None = None,
    scans: Sequence[str] | None = None, prompts: Sequence[str] | str | None = None, device: str = "cpu",
    max_new_tokens: int = 96,
) -> list[Path]:
    """Python equivalent of the bundle's ``inference.json``: -> the JSON files written (one per scan)."""
    from monai.engines import SupervisedEvaluator

    from radfm3d.engine.inferer import GenerationInferer
    from radfm3d.engine.prepare import PrepareBatchVLM
    from radfm3d.engine.training import load_processor, load_trained_model

    processor = load_processor(model_dir)
    model = load_trained_model(model_dir, device=device)
    dataset = ScanDataset(dataset_dir, scans, prompt_list(prompts))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=ScanPromptsCollate(processor))
    writer = ScanResultWriter(output_dir, model_dir, processor)
    SupervisedEvaluator(device=torch.device(device), val_data_loader=loader, network=model,
                        inferer=GenerationInferer(processor, max_new_tokens=max_new_tokens),
                        prepare_batch=PrepareBatchVLM(), val_handlers=[writer], decollate=False).run()
    return writer.written
