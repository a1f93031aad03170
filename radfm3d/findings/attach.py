# Copyright (c) radfm3d contributors. Apache-2.0.
"""Attach the findings reader to a model folder (``radfm3d findings-prompt``) and migrate older findings folders
(``radfm3d findings-migrate``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["attach_findings_prompt", "migrate_folder", "cli", "migrate_cli"]

logger = logging.getLogger(__name__)


def attach_findings_prompt(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           heads_dir: str | os.PathLike | None = None, schema: Any = None,
                           num_tokens: int | None = None, threshold: float | None = None, replace: bool = False,
                           test_time_shifts: Any = None, snap_boxes: bool | None = None) -> Path:
    """Write ``out_dir``: the model of ``model_dir`` as a :class:`~radfm3d.findings.model.RadFM3DFindingsModel`
    whose reader's head comes from the stage-0 ``structured_head.safetensors`` in ``heads_dir`` (default
    ``model_dir``), with the label schema ``schema`` (a file, folder or dict; default: the ``label_schema.json``
    beside the heads), and its processor expanding each image to the visual tokens + ``num_tokens`` reading slots
    (default 24). ``replace=True``: a findings model gets new heads and/or settings, keeping its number of slots
    (its LLM stage was trained with them) and, unless given, its schema, threshold, shifts and snapping (without a
    head file the model's own head is kept, e.g. only a new threshold). ``test_time_shifts``: ``"2,2,0;-2,-2,0"``
    or a list of triples (``"none"`` removes them); ``snap_boxes``: grounding boxes snapped onto the head's finding
    boxes. The base LLM is not loaded (the folder still names it)."""
    from radfm3d.engine.training import load_processor
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.findings.heads import HEAD_FILE, read_head_file
    from radfm3d.findings.model import attach_reader
    from radfm3d.findings.reader import reader_settings
    from radfm3d.findings.schema import SCHEMA_FILE, load_schema
    from radfm3d.modeling.model import RadFM3DForCausalLM

    heads_folder = Path(heads_dir if heads_dir is not None else model_dir)
    head_file = heads_folder / HEAD_FILE
    processor = load_processor(model_dir)
    model = RadFM3DForCausalLM.from_pretrained(model_dir, load_text_weights=False)
    reader = getattr(model, "reader", None)
    if reader is not None and not replace:
        raise RadFM3DInputError(model_dir, "the model already has a findings reader (replace it with --replace)")
    settings: dict[str, Any] = dict(reader.settings) if reader is not None else {"num_tokens": 24, "threshold": 0.5}
    if head_file.is_file():
        state = read_head_file(head_file)
        default_schema = heads_folder / SCHEMA_FILE
        if "head.net.2.weight" in state:  # the hidden width the heads were trained with
            settings["head_hidden"] = int(state["head.net.2.weight"].shape[0])
    elif reader is not None and heads_dir is None:  # the model's own head: e.g. only a new threshold
        state = {f"head.{k}": v for k, v in reader.head.state_dict().items()}
        default_schema = None
    else:
        raise RadFM3DInputError(head_file, "no vision pre-training heads here (run the pretrain_vision stage first)")
    if schema is not None:
        label_schema = load_schema(schema)
    elif default_schema is not None and default_schema.is_file():
        label_schema = load_schema(default_schema)
    elif reader is not None:
        label_schema = reader.schema
    else:
        raise RadFM3DInputError(heads_folder, f"no {SCHEMA_FILE} beside the heads: name the label schema (--schema)")
    if num_tokens is not None:
        if reader is not None and int(num_tokens) != reader.num_tokens:
            raise RadFM3DInputError(model_dir, f"a replaced reader keeps its {reader.num_tokens} slots (the LLM "
                                    f"stage was trained with them), got --num-tokens {num_tokens}")
        settings["num_tokens"] = int(num_tokens)
    if threshold is not None:
        settings["threshold"] = float(threshold)
    if test_time_shifts is not None:
        settings["test_time_shifts"] = test_time_shifts
    if snap_boxes is not None:
        settings["snap_boxes"] = bool(snap_boxes)
    try:
        settings = reader_settings(settings)
        if settings["snap_boxes"] and not label_schema.has("finding_box"):
            raise ValueError(f"box snapping needs finding boxes, which the label schema {label_schema.name!r} "
                             "does not have")
        findings_model = attach_reader(model, label_schema, state, processor.tokenizer, settings)
    except ValueError as err:
        raise RadFM3DInputError(model_dir, str(err)) from None
    out = Path(out_dir)
    findings_model.save_pretrained(out)
    processor.num_image_tokens = findings_model.tokens_per_image
    processor.check_config(findings_model.config)
    processor.save_pretrained(out)
    logger.info(f"findings reader ({settings['num_tokens']} tokens, threshold {settings['threshold']}, schema "
                f"{label_schema.name!r}"
                f"{', test-time shifts ' + str(settings['test_time_shifts']) if settings['test_time_shifts'] else ''}"
                f"{', box snapping' if settings['snap_boxes'] else ''}) attached: {out}")
    return out


def migrate_folder(folder: str | os.PathLike, schema: Any = None) -> list[Path]:
    """Rewrite an older findings model folder in place (config only; the weights file is untouched): ``config.json``
    in the findings layout (:func:`radfm3d.findings.model.migrate_config`) and ``label_schema.json`` (``schema``, or
    the class names, sites and phrases of the old config). With ``schema`` given, its classes and phrases must be
    those of the old config. Returns the files written (none for a folder already migrated)."""
    from radfm3d.errors import RadFM3DInputError
    from radfm3d.findings.model import legacy_schema, migrate_config
    from radfm3d.findings.schema import SCHEMA_FILE, load_schema
    from radfm3d.utils import atomic_write

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise RadFM3DInputError(path, "no config.json: not a model folder")
    data = json.loads(path.read_text())
    spec = data.get("findings_prompt")
    if not spec:
        return []
    derived = load_schema(legacy_schema(spec))
    label_schema = derived if schema is None else load_schema(schema)
    mismatch = [name for name in ("modalities", "regions", "structures", "finding_types", "finding_sites")
                if getattr(label_schema, name) != getattr(derived, name)]
    mismatch += [k for k, v in derived.phrases.items() if label_schema.phrases.get(k) != v]
    if mismatch:
        raise RadFM3DInputError(path, f"the label schema differs from the model's findings prompt in {mismatch[:6]}")
    try:
        migrated = migrate_config(data)
    except ValueError as err:
        raise RadFM3DInputError(path, str(err)) from None
    schema_path = label_schema.save(folder / SCHEMA_FILE)
    text = json.dumps(migrated, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return [path, schema_path]


def cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d findings-prompt MODEL --out FOLDER``: attach the findings reader to a vision-pre-trained model."""
    import argparse

    parser = argparse.ArgumentParser(prog="radfm3d findings-prompt", description=(
        "Give a model a findings reader: the vision pre-training head reads each image (modality, region, findings "
        "per site, flags, as the label schema declares) and the reading is handed to the LLM as text after the "
        "visual tokens. Train the LLM stage from the written folder."))
    parser.add_argument("model", help="model folder (e.g. models/vision_pretrained)")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--heads", default=None, help="folder with structured_head.safetensors (default: MODEL)")
    parser.add_argument("--schema", default=None,
                        help="label schema JSON (default: label_schema.json beside the heads, or the replaced one)")
    parser.add_argument("--num-tokens", type=int, default=None,
                        help="reading slots per image (default 24, or the replaced reader's)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="minimum finding score (default 0.5, or the replaced reader's)")
    parser.add_argument("--test-time-shifts", default=None, metavar="'DH,DW,DD;...'",
                        help="also read the scan moved by these voxel shifts and average the scores, e.g. "
                             "--test-time-shifts='2,2,0;-2,-2,0' ('none' removes them; default: the replaced "
                             "reader's)")
    parser.add_argument("--snap-boxes", default=None, choices=("on", "off"),
                        help="on: grounding boxes move onto the head's finding boxes when one overlaps most "
                             "(default: the replaced reader's, else off)")
    parser.add_argument("--replace", action="store_true",
                        help="the model already has a findings reader: swap in these heads/settings (same slots)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    attach_findings_prompt(args.model, args.out, args.heads, args.schema, args.num_tokens, args.threshold,
                           args.replace, args.test_time_shifts,
                           None if args.snap_boxes is None else args.snap_boxes == "on")
    print(args.out)
    return 0


def migrate_cli(argv: Sequence[str] | None = None) -> int:
    """``radfm3d findings-migrate FOLDER [--schema FILE]``: rewrite an older findings model's config in place."""
    import argparse

    parser = argparse.ArgumentParser(prog="radfm3d findings-migrate", description=(
        "Rewrite a findings model folder written before the findings room (config.json with findings_prompt): "
        "reader settings and label_schema.json instead of phrases and token ids; the weights are untouched."))
    parser.add_argument("folder")
    parser.add_argument("--schema", default=None, help="label schema JSON to write (must match the old config)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    written = migrate_folder(args.folder, args.schema)
    print("\n".join(str(p) for p in written) if written else f"{args.folder}: already migrated")
    return 0
