# Copyright (c) radfm3d contributors. Apache-2.0.
"""`radfm3d <command> ...`: one entry point, each command implemented in the room that owns it.

Commands are imported lazily so that `radfm3d --help` is instant and an optional dependency of one
command never breaks another.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("radfm3d.io:cli", "read a scan and print its geometry, modality and the preprocessing summary"),
    "phantoms": ("radfm3d.data.phantoms:cli", "generate the RadPhantom synthetic benchmark (volumes + task manifests)"),
    "import": ("radfm3d.data.importers:cli", "datasets and DICOM exports -> validated manifests (dicom-export, ct-rate, radgenome-chestct, m3d-cap, m3d-vqa, csv)"),
    "sample-tasks": ("radfm3d.data.manifest:cli", "write a task-balanced random subset of a manifest (training/test mix)"),
    "evaluate": ("radfm3d.evaluation.harness:cli", "score a model or a predictions file on a manifest"),
    "evaluate-clip": ("radfm3d.contrastive.evaluate:cli", "score image-report embedding models (zero-shot AUROC, retrieval, probe)"),
    "reading-threshold": ("radfm3d.findings.thresholds:cli", "score the findings reading per threshold on val cases"),
    "findings-prompt": ("radfm3d.findings.attach:cli", "attach the findings reader (encoder reading as text) to a model"),
    "findings-migrate": ("radfm3d.findings.attach:migrate_cli", "rewrite an older findings model's config (weights untouched)"),
    "refit-boxes": ("radfm3d.findings.box_refit:cli", "re-fit the findings head's finding boxes (box snapping) on more cases"),
    "convert-radfm": ("radfm3d.interop.radfm:cli", "convert the official RadFM pytorch_model.bin to sharded safetensors"),
    "serve": ("radfm3d.serve.app:cli", "serve a model over an OpenAI-compatible HTTP API (scans in, boxes in RAS mm out)"),
}


def _usage() -> str:
    lines = ["usage: radfm3d <command> [options]", "", "commands:"]
    lines += [f"  {name:<15} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`radfm3d <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to `module:cli(argv) -> int`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"radfm3d: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    from radfm3d.errors import RadFM3DError

    try:
        return int(func(rest) or 0)
    except (RadFM3DError, FileNotFoundError) as err:  # bad input: one line naming the file and the problem
        print(f"radfm3d {name}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
