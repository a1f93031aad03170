# Copyright (c) radfm3d contributors. Apache-2.0.
"""The scripted module ``slicer/RadFM3D`` as far as it can be checked without the Slicer application: it compiles,
follows the scripted-module layout, calls radfm3d only through ``radfm3d.slicer`` / ``radfm3d.client``, and
imports nothing of radfm3d (nor torch) at module import time."""

from __future__ import annotations

import ast
from pathlib import Path

MODULE = Path(__file__).resolve().parents[2] / "slicer" / "RadFM3D" / "RadFM3D.py"


def _tree() -> ast.Module:
    return ast.parse(MODULE.read_text(), filename=str(MODULE))


def test_layout_and_classes():
    assert (MODULE.parent / "CMakeLists.txt").read_text().count("slicerMacroBuildScriptedModule") == 1
    assert "add_subdirectory(RadFM3D)" in (MODULE.parent.parent / "CMakeLists.txt").read_text()
    compile(MODULE.read_text(), str(MODULE), "exec")
    classes = {n.name: [b.id for b in n.bases if isinstance(b, ast.Name)] for n in _tree().body
               if isinstance(n, ast.ClassDef)}
    assert classes == {"RadFM3D": ["ScriptedLoadableModule"], "RadFM3DLogic": ["ScriptedLoadableModuleLogic"],
                       "RadFM3DWidget": ["ScriptedLoadableModuleWidget"], "RadFM3DTest": ["ScriptedLoadableModuleTest"]}


def test_radfm3d_only_through_slicer_logic_and_client_and_never_at_import():
    tree = _tree()
    top_level = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_level |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert "radfm3d" not in top_level and "torch" not in top_level
    used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
            and n.module.startswith("radfm3d")}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
             if a.name.startswith("radfm3d")}
    assert used and all(m == "radfm3d.client" or m == "radfm3d.slicer" or m.startswith("radfm3d.slicer.")
                        for m in used), used
