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
