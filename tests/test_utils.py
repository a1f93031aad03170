# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import pytest

from radfm3d.utils import lazy_exports, progress_bar


def test_lazy_exports_resolves_and_rejects():
    getattr_ = lazy_exports("pkg", {"sqrt": "math"})
    assert getattr_("sqrt")(9.0) == 3.0
    with pytest.raises(AttributeError, match="module 'pkg' has no attribute 'nope'"):
        getattr_("nope")


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bar_updates_or_stays_silent(enabled):
    bar = progress_bar(3, enabled, desc="work")
    bar.update(3)
    assert bar.disable is (not enabled)
    assert bar.n == (3 if enabled else 0)
    bar.close()


def test_as_bool_reads_command_line_switches():
    import pytest

    from radfm3d.utils import as_bool

    assert [as_bool(v) for v in ("false", "False", "no", "0", 0, False)] == [False] * 6
    assert [as_bool(v) for v in ("true", "TRUE", "yes", "1", 1, True)] == [True] * 6
    assert as_bool(None) is None and as_bool("null") is None
    with pytest.raises(ValueError, match="resume"):
        as_bool("maybe", "resume")


def test_atomic_write_keeps_the_old_file_when_the_write_fails_midway(tmp_path):
    from radfm3d.utils import atomic_write

    target = tmp_path / "result.json"
    target.write_text('{"old": true}')

    def half_write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write('{"new": ')  # half of the new content is on disk ...
        raise OSError("disk full")  # ... when the write dies

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left behind
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new"


def test_atomic_json_text_and_figure_writers(tmp_path):
    import json

    import numpy as np

    from radfm3d.utils import atomic_savefig, atomic_write_json, atomic_write_text

    path = atomic_write_json(tmp_path / "sub" / "a.json", {"x": np.float32(1.5), "v": np.arange(3)})
    assert json.loads(path.read_text()) == {"x": 1.5, "v": [0, 1, 2]}
    assert atomic_write_text(tmp_path / "b.md", "# hi").read_text() == "# hi"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    png = atomic_savefig(fig, tmp_path / "figs" / "c.png", dpi=20)
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["c.png"]


def test_jsonl_appender_repairs_a_torn_last_line(tmp_path):
    import json

    from radfm3d.utils import JsonlAppender

    path = tmp_path / "preds.jsonl"
    with JsonlAppender(path) as out:
        out.write({"id": "a"})
        out.write({"id": "b"})
    with path.open("a") as fh:
        fh.write('{"id": "c", "predic')  # a run killed in the middle of a line
    with JsonlAppender(path) as out:
        assert out.repaired_bytes == len('{"id": "c", "predic')
        out.write({"id": "c"})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    path.write_text('{"id": "only half')  # no complete line at all
    with JsonlAppender(path) as out:
        out.write({"id": "d"})
    assert path.read_text() == '{"id": "d"}\n'


def test_staged_folder_publishes_whole_or_not_at_all(tmp_path):
    from radfm3d.utils import staged_folder

    out = tmp_path / "model"
    with staged_folder(out) as partial:
        assert partial.is_dir() and partial.name.startswith(".model.partial-") and not out.exists()
        (partial / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="stop"):
        with staged_folder(out) as partial:
            (partial / "a.txt").write_text("two")
            raise RuntimeError("stop")
    assert (out / "a.txt").read_text() == "one"  # the old folder is kept whole
    with staged_folder(out) as partial:
        (partial / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial or old folder left
