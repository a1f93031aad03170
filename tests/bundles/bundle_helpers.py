# Copyright (c) radfm3d contributors. Apache-2.0.
"""What the bundle tests share: a bundle's config paths and a tiny RadPhantom set to run it on."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bundle_files(name: str) -> tuple[Path, Path, str, str]:
    """(bundle folder, its configs folder, metadata.json, logging.conf) of ``bundles/<name>``."""
    bundle = ROOT / "bundles" / name
    configs = bundle / "configs"
    return bundle, configs, str(configs / "metadata.json"), str(configs / "logging.conf")


def tiny_phantoms(root: Path, n: int, studies: int = 0) -> Path:
    """``n`` tiny phantom cases (32x32x8 grid; no DICOM copies, no priors) and ``studies`` CT + MR T1 + MR T2
    studies, written to ``root / "phantoms"``; returns ``root``."""
    from radfm3d.data.phantoms import generate_phantoms

    generate_phantoms(root / "phantoms", n=n, seed=0, grid=(32, 32, 8), matrix=(32, 40), slices=(8, 10),
                      dicom_fraction=0.0, prior_fraction=0.0, progress=False, studies=studies)
    return root


def check_workflow(workflow) -> None:
    """Run a ``monai.bundle.ConfigWorkflow`` the model-zoo way: initialise, check its properties, run, finalise."""
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()


METADATA_KEYS = ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
                 "description", "authors", "copyright", "network_data_format", "schema", "changelog")


def check_metadata(configs: Path) -> dict:
    """``configs/metadata.json`` holds the MONAI bundle metadata keys and its version has a changelog entry;
    returns it."""
    import json

    meta = json.loads((configs / "metadata.json").read_text())
    for key in METADATA_KEYS:
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    return meta


def check_config_targets(configs: Path) -> None:
    """Every ``_target_`` of the bundle's configs points into radfm3d, monai, torch or ignite (or is a bare name)."""
    for cfg in configs.glob("*.json"):
        text = cfg.read_text()
        targets = [line.split('"_target_":')[1].strip().strip('",') for line in text.splitlines() if "_target_" in line]
        for target in targets:
            assert target.split(".")[0] in ("radfm3d", "torch", "monai", "ignite") or "." not in target, (cfg, target)
