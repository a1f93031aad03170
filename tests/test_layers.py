# Copyright (c) radfm3d contributors. Apache-2.0.
"""The import contract (``.importlinter``, docs/dev/LAYERS.md) holds for the package, it does catch a back-edge,
and no module of radfm3d takes part in an import cycle (imports inside functions count)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import grimp  # noqa: E402 - comes with import-linter (the test extra)

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contract over the ``radfm3d`` found under ``package_parent``."""
    cmd = [str(LINT)] if LINT.is_file() else [
        sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([*cmd, str(ROOT / ".importlinter"), "--no-cache", "--no-logo"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def test_import_contract_is_kept():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[proc.stdout.find("Broken contracts"):] or proc.stdout + proc.stderr


def test_import_contract_catches_a_back_edge(tmp_path):
    """The same contract over a copy of the package in which io imports the model fails, naming the import."""
    shutil.copytree(ROOT / "radfm3d", tmp_path / "radfm3d", ignore=shutil.ignore_patterns("__pycache__"))
    io_py = tmp_path / "radfm3d" / "io.py"
    io_py.write_text(io_py.read_text() + "\n\ndef _back_edge():\n    from radfm3d.modeling import model  # noqa\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "radfm3d.io -> radfm3d.modeling.model" in proc.stdout, proc.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    adj = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(adj):
        if root in index:
            continue
        work = [(root, iter(adj[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(adj[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_module_import_cycles():
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("radfm3d", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    assert "radfm3d.data.phantoms.generate" in graph.modules  # the graph is the checkout's package
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    graph.add_import(importer="p", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]
