# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import importlib

import pytest

from radfm3d.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_target_exists(name):
    module_name, func_name = COMMANDS[name][0].split(":")
    assert callable(getattr(importlib.import_module(module_name), func_name))


def test_bad_input_is_one_line_naming_the_problem_not_a_traceback(tmp_path, capsys):
    """A command that meets bad input (a folder without a model; a malformed option on a real model) exits 2 with
    ``radfm3d <command>: <source>: <problem>`` on stderr and writes nothing."""
    from pathlib import Path

    out = tmp_path / "out"
    assert main(["findings-prompt", str(tmp_path / "no_model"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radfm3d findings-prompt: ") and "no_model" in err and "Traceback" not in err
    shipped = Path(__file__).resolve().parents[1] / "bundles" / "radfm3d_demo" / "models" / "model"
    assert main(["findings-prompt", str(shipped), "--replace", "--test-time-shifts=1,1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radfm3d findings-prompt: ") and "three whole voxel counts" in err and not out.exists()
