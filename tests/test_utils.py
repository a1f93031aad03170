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
