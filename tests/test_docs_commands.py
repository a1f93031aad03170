# Copyright (c) radfm3d contributors. Apache-2.0.
"""Every command line in README.md, docs/ and the bundle's docs is checked against the real command.

- ``radfm3d <command> ...`` in a fenced code block: the command exists, every ``--option`` the line uses appears in
  the command's ``--help``, and the line (meta-syntax ``[...]``, ``(a | b)``, ``...`` resolved to its first reading)
  parses with the command's own argparse parser. ``radfm3d <command> ...`` in inline code: command and options.
- ``python -m monai.bundle run --config_file ... --key value`` (also under ``torchrun``): the config files exist,
  merge with MONAI's ``ConfigParser``, and every ``--key`` override names an entry of the merged config (MONAI would
  silently add a mistyped key).
- ``python -m radfm3d...`` / ``python -m benchmarks...``: the module exists (and, in a fenced block, answers
  ``--help``).

In process (``radfm3d.cli.main`` with the parsers stopped right after parsing), so the test takes seconds.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "radfm3d_demo"  # the bundle a run line outside a bundle's own docs refers to
BUNDLE_DOCS = sorted((ROOT / "bundles").glob("*/docs/README.md"))
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *BUNDLE_DOCS]
#: ``monai.bundle run`` arguments that are not config ids
BUNDLE_RUN_ARGS = {"config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id",
                   "tracking"}
_FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1", re.S | re.M)
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class DocCommand:
    source: str  # file:line
    text: str
    fenced: bool

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        fenced_spans = []
        for block in _FENCE.finditer(text):
            fenced_spans.append(block.span())
            start = block.start(2)
            logical = ""
            for offset, line in enumerate(block.group(2).splitlines()):
                logical = f"{logical} {line.strip()}" if logical else line.strip()
                if logical.endswith("\\"):
                    logical = logical[:-1].rstrip()
                    continue
                cmd = logical.removeprefix("$ ").strip()
                logical = ""
                if re.match(r"^(radfm3d(\s|$)|python -m (monai\.bundle|radfm3d|benchmarks)\b|torchrun\s)", cmd):
                    line_no = _line_of(text, start) + offset
                    found.append(DocCommand(f"{rel}:{line_no}", cmd, True))
        for match in _INLINE.finditer(text):
            if any(a <= match.start() < b for a, b in fenced_spans):
                continue
            cmd = " ".join(match.group(1).split())
            if re.match(r"^(radfm3d [a-z]|python -m (radfm3d|benchmarks)\b)", cmd):
                found.append(DocCommand(f"{rel}:{_line_of(text, match.start())}", cmd, False))
    return found


COMMANDS = _commands()
RADFM3D = [c for c in COMMANDS if c.text.startswith("radfm3d ")]
BUNDLE_RUNS = [c for c in COMMANDS if "monai.bundle run" in c.text]
MODULES = [c for c in COMMANDS if re.match(r"^python -m (radfm3d|benchmarks)", c.text)]


def _tokens(cmd: str) -> list[str]:
    """Shell words of a command line; a ``#`` comment starts after whitespace (``--lora#r 16`` is a MONAI id)."""
    return shlex.split(re.sub(r"(^|\s)#.*$", "", cmd))


def _first_reading(tokens: list[str]) -> list[str]:
    """Resolve documentation meta-syntax: ``[opt]`` -> opt, ``(a | b | c)`` -> a, ``...`` dropped."""
    out: list[str] = []
    skipping = in_group = False
    for tok in tokens:
        if tok == "...":
            continue
        if tok.startswith(("['", '["')):  # a Python list (monai.bundle's --config_file), not meta-syntax
            if not skipping:
                out.append(tok)
            continue
        opens, closes = tok.startswith("("), tok.endswith(")")
        tok = tok.strip("()")
        if opens:
            in_group, skipping = True, False
        if in_group and tok == "|":
            skipping = True
        elif not skipping and tok:
            out.append(tok.replace("[", "").replace("]", ""))
        if closes and in_group:
            in_group = skipping = False
    return [t for t in out if t]


def _options(tokens: list[str]) -> set[str]:
    opts = set()
    for tok in tokens:
        tok = tok.strip("[]()")
        if tok.startswith("--") and len(tok) > 2:
            opts.add(tok.split("=", 1)[0])
    return opts


# ----------------------------------------------------------------------------------------------- radfm3d commands
class _Parsed(Exception):
    pass


_HELP: dict[tuple[str, ...], str] = {}


def _run_help(argv: list[str]) -> str:
    """stdout of ``radfm3d ARGV`` (a ``--help`` request), asserting it succeeds."""
    from radfm3d.cli import main

    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv) or 0
        except SystemExit as exit_info:
            code = exit_info.code or 0
    assert code == 0, f"radfm3d {' '.join(argv)} failed ({code})"
    return out.getvalue()


def _help(words: tuple[str, ...]) -> str:
    if words not in _HELP:
        _HELP[words] = _run_help([*words, "--help"])
    return _HELP[words]


def _subcommands(help_text: str) -> list[str]:
    """Names a dispatcher command lists (``usage: radfm3d import <format> ...`` then ``  name   description``)."""
    if not re.search(r"^usage: radfm3d \S+ <\w+>", help_text, re.M):
        return []
    return re.findall(r"^  ([a-z][a-z0-9_-]*)\s+\S", help_text, re.M)


def _parse_only(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[bool, str]:
    """Run ``radfm3d.cli.main(argv)`` but stop right after argparse has parsed: (parsed, argparse's stderr)."""
    from radfm3d.cli import main

    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
    except _Parsed:
        return True, ""
    except SystemExit:
        return False, err.getvalue()
    finally:
        monkeypatch.undo()
    return False, "the command ran without parsing its arguments with argparse"


def test_docs_have_commands_to_check() -> None:
    assert len(RADFM3D) >= 10 and len(BUNDLE_RUNS) >= 5
    # every bundle's README is read, and each one has run lines to check
    assert {p.parts[-3] for p in BUNDLE_DOCS} >= {"radfm3d_demo", "radfm3d_clip"}
    for readme in BUNDLE_DOCS:
        rel = str(readme.relative_to(ROOT))
        assert any(c.source.startswith(rel + ":") for c in BUNDLE_RUNS), f"{rel}: no monai.bundle run line"
    assert any("convert-radfm" in c.text for c in RADFM3D)


@pytest.mark.parametrize("doc", RADFM3D, ids=[c.source for c in RADFM3D])
def test_radfm3d_command_lines_match_the_real_commands(doc: DocCommand, monkeypatch: pytest.MonkeyPatch) -> None:
    from radfm3d.cli import COMMANDS as CLI_COMMANDS

    tokens = _tokens(doc.text)
    assert len(tokens) >= 2 and tokens[1] in CLI_COMMANDS, f"{doc}: unknown command {tokens[1:2]}"
    words: tuple[str, ...] = (tokens[1],)
    subcommands = _subcommands(_help(words))
    if subcommands and len(tokens) > 2 and not tokens[2].startswith("-"):  # ``radfm3d import csv ...``
        sub = subcommands[0] if re.fullmatch(r"<\w+>", tokens[2]) else tokens[2]
        assert sub in subcommands, f"{doc}: {tokens[2]!r} is not one of `radfm3d {tokens[1]}`'s {subcommands}"
        words = (tokens[1], sub)
    command = " ".join(words)
    help_text = _help(words)
    known = set(re.findall(r"(--[A-Za-z0-9][-A-Za-z0-9_]*)", help_text)) | {"--help"}
    unknown = sorted(_options(tokens) - known)
    assert not unknown, (f"{doc}: options {unknown} are not options of `radfm3d {command}` "
                         f"(--help lists {sorted(known)})")
    if not doc.fenced:
        return
    argv = [*words, *_first_reading(tokens[1 + len(words):])]
    if "--help" in argv or "-h" in argv:
        _run_help(argv)  # a help request is run for real
        return
    parsed, error = _parse_only(argv, monkeypatch)
    if not parsed:
        # a metavar placeholder (N, DIR) given to a typed option is a documentation convention, not an error
        bad = re.search(r"invalid \w+ value: '([^']*)'", error)
        assert bad and _PLACEHOLDER.match(bad.group(1)), f"{doc}: does not parse as `radfm3d {command}`:\n{error}"


# ----------------------------------------------------------------------------------------------- bundle runs
def _bundle_of(doc: DocCommand) -> Path:
    """The bundle folder a run line's config files are relative to: the bundle whose docs hold the line, else the
    demo bundle."""
    parts = Path(doc.source.rsplit(":", 1)[0]).parts
    return ROOT / "bundles" / parts[1] if len(parts) > 2 and parts[0] == "bundles" else BUNDLE


def _bundle_config(files: list[str], bundle: Path = BUNDLE):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    paths = []
    for name in files:
        path = (bundle / name) if not Path(name).is_absolute() else Path(name)
        if not path.is_file() and (ROOT / name).is_file():  # a line run from the repository root
            path = ROOT / name
        assert path.is_file(), f"config file {name} not found in {bundle} or {ROOT}"
        paths.append(str(path))
    parser.read_config(paths)
    return parser


@pytest.mark.parametrize("doc", BUNDLE_RUNS, ids=[c.source for c in BUNDLE_RUNS])
def test_bundle_run_lines_name_real_configs_and_keys(doc: DocCommand) -> None:
    tokens = _first_reading(_tokens(doc.text))
    run = tokens.index("run")
    assert tokens[run - 1] == "monai.bundle", doc
    args: dict[str, list[str]] = {}
    key = None
    for tok in tokens[run + 1:]:
        if tok.startswith("--"):
            name, _, value = tok[2:].partition("=")
            key = name
            args.setdefault(key, [])
            if value:
                args[key].append(value)
        elif key is not None:
            args[key].append(tok)
    assert "config_file" in args and len(args["config_file"]) == 1, f"{doc}: needs one --config_file"
    spec = args["config_file"][0]
    files = ast.literal_eval(spec) if spec.startswith("[") else [spec]
    config = _bundle_config(list(files), _bundle_of(doc))
    for name, values in args.items():
        if name in BUNDLE_RUN_ARGS:
            continue
        assert len(values) == 1, f"{doc}: --{name} takes one value, got {values}"
        assert name.replace("#", "::") in config or name in config, (
            f"{doc}: --{name} is not an entry of {files} (monai.bundle would add it silently)")


# ----------------------------------------------------------------------------------------------- python -m
def _module(doc: DocCommand) -> str:
    return re.match(r"python -m (\S+)", doc.text).group(1)


@pytest.mark.parametrize("doc", MODULES, ids=[c.source for c in MODULES])
def test_python_module_lines_name_real_modules(doc: DocCommand) -> None:
    assert importlib.util.find_spec(_module(doc)) is not None, f"{doc}: no such module"


FENCED_MODULES = sorted({_module(c) for c in MODULES if c.fenced})


def test_some_python_module_line_is_fenced() -> None:
    assert FENCED_MODULES, "no python -m radfm3d/benchmarks line in a fenced block of the docs"


@pytest.mark.parametrize("module", FENCED_MODULES)
def test_python_module_lines_answer_help(module: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"python -m {module} --help: {done.stderr[-2000:]}"
