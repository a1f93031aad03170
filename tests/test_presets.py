# Copyright (c) radfm3d contributors. Apache-2.0.
"""The model presets ship inside the package: a built wheel holds them, and from the unpacked wheel they load by
name from another working directory (``from_preset``, ``list_presets`` and ``convert-radfm``'s default config)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("demo", "radfm-13b", "tiny")


def test_presets_are_package_data():
    from radfm3d.modeling.configuration import PRESET_DIR, RadFM3DConfig, list_presets

    assert PRESET_DIR == ROOT / "radfm3d" / "presets"
    assert set(PRESETS) <= set(list_presets())
    assert RadFM3DConfig.from_preset("demo").to_dict() == RadFM3DConfig.from_preset(PRESET_DIR / "demo.json").to_dict()


@pytest.mark.slow  # builds a wheel and imports torch/transformers in a fresh process
def test_wheel_holds_the_presets_and_they_load_from_another_cwd(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "radfm3d", src / "radfm3d", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("radfm3d-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"radfm3d/presets/{p}.json" for p in PRESETS} <= names
        site = tmp_path / "site"
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import json, radfm3d\n"
            "from radfm3d.modeling.configuration import RadFM3DConfig, list_presets\n"
            "from radfm3d.interop.radfm import _resolve_config\n"
            "print(json.dumps({'file': radfm3d.__file__, 'presets': list_presets(),\n"
            "                  'demo': RadFM3DConfig.from_preset('demo').text_model_name_or_path,\n"
            "                  'convert_default': _resolve_config(None).text_config.hidden_size}))\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(site), out["file"]  # the wheel's copy, not the checkout
    assert set(PRESETS) <= set(out["presets"])
    demo = json.loads((ROOT / "radfm3d" / "presets" / "demo.json").read_text())
    assert out["demo"] == demo.get("text_model_name_or_path")
    radfm = json.loads((ROOT / "radfm3d" / "presets" / "radfm-13b.json").read_text())
    assert out["convert_default"] == radfm["text_config"]["hidden_size"]
