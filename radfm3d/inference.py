# Copyright (c) radfm3d contributors. Apache-2.0.
"""Bundle inference: scans (NIfTI / NRRD / MHA / DICOM folder) + prompts -> one JSON (and one PNG) per scan.

Each JSON holds, per prompt, the generated text and any boxes in model-grid 0-99 steps, original voxel indices
and world RAS mm; plus timings, the model folder and the preprocessing recipe used. A MONAI ``SupervisedEvaluator``
runs it (``bundles/radfm3d_demo/configs/inference.json``); :func:`run_inference` is the same from Python.

A scan that cannot be read, preprocessed or answered does not stop the others: the collate marks it, the
iteration (:func:`scan_iteration`) skips the model for it, and the writer records it. At the end of the run the
writer writes ``failures.json`` (``[{"scan", "problem"}]``; none when all went well), prints a summary and, when any
scan failed, raises :class:`~radfm3d.errors.RadFM3DInputError` (after every good scan was written), so that
``python -m monai.bundle run`` exits non-zero. Every file is written atomically.
"""

from __future__ import annotations

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
    "output_names",
    "ScanDataset",
    "ScanPromptsCollate",
    "scan_iteration",
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


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def output_names(scans: Sequence[str | os.PathLike]) -> list[str]:
    """Output base name per scan (``<name>.json`` / ``<name>.png``): the file name without its scan suffix, unless
    two scans of the run would share it (``ct.nii.gz`` and ``ct.nrrd``, or two folders' ``scan.nii``): those keep
    their full file name (``ct.nii.gz``, ``ct.nrrd``), and scans still alike get their parent folder's name in
    front. Case-insensitive (as on macOS and Windows file systems); deterministic for a given list."""
    def clashes(names: list[str]) -> set[str]:
        counts: dict[str, int] = {}
        for n in names:
            counts[n.lower()] = counts.get(n.lower(), 0) + 1
        return {n for n, c in counts.items() if c > 1}

    paths = [Path(s) for s in scans]
    names = [_stem(p) for p in paths]
    for rename in (lambda p: p.name, lambda p: f"{p.parent.name}_{p.name}"):
        dup = clashes(names)
        if not dup:
            break
        names = [rename(p) if n.lower() in dup else n for p, n in zip(paths, names)]
    dup = clashes(names)
    if dup:  # still alike (the same path twice): number them in list order
        seen: dict[str, int] = {}
        for i, n in enumerate(names):
            if n.lower() in dup:
                seen[n.lower()] = seen.get(n.lower(), 0) + 1
                names[i] = f"{n}_{seen[n.lower()]}"
    return names


class ScanDataset(torch.utils.data.Dataset):
    """Items ``{"scan": path, "name": output base name, "prompts": [...]}``, one per scan; every scan gets the same
    prompts; names from :func:`output_names` (unique within the run)."""

    def __init__(self, dataset_dir: str | os.PathLike | None = None, scans: Sequence[str] | str | None = None,
                 prompts: Sequence[str] | None = None) -> None:
        self.scans = find_scans(dataset_dir, scans)
        self.prompts = list(prompts) if prompts else default_prompts()
        self.data = [{"scan": s, "name": n, "prompts": self.prompts}
                     for s, n in zip(self.scans, output_names(self.scans))]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.data[index]


def _problem(err: BaseException, scan: Any = None) -> str:
    """A failure as one line: a RadFM3DInputError as written (its problem alone when it names ``scan``), anything
    else with its type name."""
    if isinstance(err, RadFM3DInputError):
        same = scan is not None and err.source is not None and os.fspath(err.source) == os.fspath(scan)
        return err.problem if same else str(err)
    return f"{type(err).__name__}: {err}".strip()


class ScanPromptsCollate:
    """One scan + its prompts -> a left-padded batch of P prompts on the same (once-read) image.

    Adds ``scan``, ``name``, ``prompts``, ``grid_geometry`` (dict), ``image`` (the original MetaTensor, for drawing)
    and ``timings_s`` (``load``, ``preprocess``) to the model inputs. A scan that cannot be read or preprocessed
    gives ``{"scan", "name", "prompts", "error": problem}`` instead (no model inputs), for :func:`scan_iteration` to
    pass on to the writer.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(items) != 1:
            raise ValueError("ScanPromptsCollate takes one scan per batch (batch_size=1)")
        from radfm3d.io import load_image

        item = items[0]
        prompts = list(item["prompts"])
        name = item.get("name") or _stem(item["scan"])
        try:
            t0 = time.perf_counter()
            image = load_image(item["scan"])
            t1 = time.perf_counter()
            feats = self.processor(text=prompts, images=[[image] for _ in prompts], return_tensors="pt",
                                   padding_side="left")
            t2 = time.perf_counter()
        except Exception as err:  # one bad scan must not stop the run: recorded by the writer
            return {"scan": item["scan"], "name": name, "prompts": prompts, "error": _problem(err, item["scan"])}
        batch = {k: feats[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask") if k in feats}
        geoms = feats.get("grid_geometry") if hasattr(feats, "get") else None
        batch.update({"scan": item["scan"], "name": name, "prompts": prompts, "image": image,
                      "grid_geometry": geoms[0][0] if geoms and geoms[0] else None,
                      "timings_s": {"load": t1 - t0, "preprocess": t2 - t1}})
        return batch


def scan_iteration(engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
    """``SupervisedEvaluator(iteration_update=...)``: the evaluator's own iteration on a good scan; a scan the
    collate marked bad, or one whose generation raises, gives ``{"error": problem}`` as the output instead, and the
    run goes on with the next scan."""
    if batch.get("error"):
        engine.state.output = {"error": batch["error"]}
        return engine.state.output
    try:
        return engine._iteration(engine, batch)
    except Exception as err:  # e.g. a prompt too long for the model, out of memory on one huge scan
        logger.debug("generation failed on %s", batch.get("scan"), exc_info=True)
        engine.state.output = {"error": _problem(err, batch.get("scan"))}
        return engine.state.output


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
                   title: str = "", affine: Any = None) -> Path:
    """Axial, coronal and sagittal planes of the original volume through the first box's centre, every box drawn.

    The planes are true anatomical planes cut through the image's voxel -> RAS affine (``image.affine`` of a
    MetaTensor, else ``affine``, else identity), shown in the radiological convention with R/L, A/P, S/I edge
    markers (:mod:`radfm3d.evaluation.figures`: patient right on the image left in axial and coronal). Boxes are
    in voxel coordinates of the original volume (``box_voxel`` of the inference JSON); channel 0; display window
    = 1st-99th percentile. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radfm3d.evaluation.figures import anatomical_slices, boxes_voxel_to_world, draw_slice_plane
    from radfm3d.utils import atomic_savefig

    if affine is None:
        affine = getattr(image, "affine", None)
    affine = np.eye(4) if affine is None else np.asarray(affine.detach().cpu() if hasattr(affine, "detach")
                                                         else affine, dtype=np.float64)
    vol = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    vol = vol[0] if vol.ndim == 4 else vol
    lo, hi = np.percentile(vol, [1, 99])
    boxes = boxes_voxel_to_world(boxes_voxel, affine)
    centre = (boxes[0, :3] + boxes[0, 3:]) / 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, plane in zip(axes, anatomical_slices(vol, affine, centre)):
        draw_slice_plane(ax, plane, boxes, vmin=lo, vmax=hi)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=100)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------- writer
class ScanResultWriter:
    """Handler: writes ``<output_dir>/<name>.json`` (and ``.png`` when a box was found) per scan, atomically.

    Reads the batch of :class:`ScanPromptsCollate` and ``engine.state.output["pred"]`` (texts, one per prompt), or
    ``engine.state.output["error"]`` for a scan that failed (:func:`scan_iteration`). ``name`` comes from the batch
    (:func:`output_names`: unique within the run). A figure that cannot be drawn is a failure of its own; the JSON is
    still written. At the end of the run (``Events.COMPLETED``, or :meth:`finish`): ``failures.json`` (a list of
    ``{"scan", "problem"}``, only when something failed), a printed summary, and with ``raise_on_failure`` a
    :class:`RadFM3DInputError` when any scan failed.
    """

    def __init__(self, output_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 processor: Any = None, draw: bool = True, print_results: bool = True,
                 raise_on_failure: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.processor = processor
        self.draw, self.print_results = bool(draw), bool(print_results)
        self.raise_on_failure = bool(raise_on_failure)
        self.written: list[Path] = []
        self.failures: list[dict[str, str]] = []
        self._scans = 0
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def _reset(self, engine: Engine | None = None) -> None:
        """Run start: refuse an output folder that cannot be written before any scan is read."""
        from radfm3d.utils import writable_dir

        writable_dir(self.output_dir, "output_dir")
        self.written, self.failures, self._scans = [], [], 0

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

    def _fail(self, scan: Any, problem: str) -> None:
        self.failures.append({"scan": str(scan), "problem": problem})
        if self.print_results:
            print(f"!! {scan}: FAILED: {problem}", flush=True)

    def write(self, engine: Engine) -> Path | None:
        """Write the current scan's JSON (and PNG); -> its path, or None when the scan failed."""
        batch, output = engine.state.batch, engine.state.output
        self._scans += 1
        scan = Path(batch["scan"])
        error = (output or {}).get("error") if isinstance(output, Mapping) else None
        if error or batch.get("error"):
            self._fail(scan, error or batch["error"])
            return None
        texts = list(output["pred"])
        generate_s = time.perf_counter() - self._t0
        name = batch.get("name") or _stem(scan)
        try:
            result = self._result(engine, batch, texts, generate_s)
        except Exception as err:  # e.g. a box the geometry cannot place: this scan fails, the run goes on
            self._fail(scan, _problem(err, batch["scan"]))
            return None
        voxel_boxes = [b["box_voxel"] for a in result["answers"] for b in a["boxes"] if "box_voxel" in b]
        image = batch.get("image")
        if self.draw and voxel_boxes and image is not None:
            try:
                result["png"] = str(draw_boxes_png(image, voxel_boxes, self.output_dir / f"{name}.png",
                                                   title=scan.name))
            except Exception as err:  # the figure is a courtesy: the answers are still written
                self._fail(scan, f"figure not drawn: {_problem(err)}")
        from radfm3d.utils import atomic_write_json

        try:
            path = atomic_write_json(self.output_dir / f"{name}.json", result)
        except Exception as err:  # e.g. the disk filled up: the old file (if any) is intact, the run goes on
            self._fail(scan, f"result not written: {_problem(err)}")
            return None
        self.written.append(path)
        if self.print_results:
            self._print(scan, path, result)
        return path

    def _result(self, engine: Engine, batch: Mapping[str, Any], texts: list[str], generate_s: float) -> dict:
        scan = Path(batch["scan"])
        geometry = batch.get("grid_geometry")
        image = batch.get("image")
        answers = [{"prompt": p, "text": t, "boxes": boxes_in_text(t, geometry)}
                   for p, t in zip(batch["prompts"], texts)]
        return {
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

    @staticmethod
    def _print(scan: Path, path: Path, result: Mapping[str, Any]) -> None:
        lines = [f"== {scan} -> {path}"]
        if result["image_reading"]:
            lines.append(f"  ({result['image_reading']['text']})")
        for a in result["answers"]:
            lines.append(f"  Q: {a['prompt']}\n  A: {a['text']}")
            for b in a["boxes"]:
                if "box_world_mm" in b:
                    lines.append(f"     box voxel {np.round(b['box_voxel'], 1).tolist()} "
                                 f"world mm {np.round(b['box_world_mm'], 1).tolist()}")
        print("\n".join(lines), flush=True)

    def finish(self, engine: Engine | None = None) -> Path | None:
        """Print the summary; with failures write ``failures.json`` (else remove a stale one of an earlier run in
        ``output_dir``) and, with ``raise_on_failure``, raise. -> the failures file, None when nothing failed."""
        from radfm3d.utils import atomic_write_json

        path = self.output_dir / "failures.json"
        failed = sorted({f["scan"] for f in self.failures})
        if failed:
            atomic_write_json(path, self.failures)
        elif path.is_file():
            path.unlink()
        summary = (f"inference: {self._scans} scan(s), {len(self.written)} result(s) written to {self.output_dir}, "
                   f"{len(failed)} scan(s) with a failure" + (f" (listed in {path})" if failed else ""))
        lines = [summary] + [f"  {f['scan']}: {f['problem']}" for f in self.failures]
        if self.print_results or failed:
            print("\n".join(lines), flush=True)
        if failed and self.raise_on_failure:
            raise RadFM3DInputError(path, f"{len(failed)} of {self._scans} scan(s) failed, every other scan was "
                                          f"written: " + "; ".join(f"{f['scan']}: {f['problem']}"
                                                                   for f in self.failures))
        return path if failed else None


# ----------------------------------------------------------------------------------------------- API
def run_inference(
    model_dir: str | os.PathLike, output_dir: str | os.PathLike, dataset_dir: str | os.PathLike | None = None,
    scans: Sequence[str] | None = None, prompts: Sequence[str] | str | None = None, device: str = "cpu",
    max_new_tokens: int = 96,
) -> list[Path]:
    """Python equivalent of the bundle's ``inference.json``: -> the JSON files written (one per good scan).

    Raises :class:`RadFM3DInputError` after the run when any scan failed (every good scan is written first).
    """
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
                        prepare_batch=PrepareBatchVLM(), val_handlers=[writer], decollate=False,
                        iteration_update=scan_iteration).run()
    return writer.written
