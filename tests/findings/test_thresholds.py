# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import math

import pytest

from radfm3d.findings.thresholds import SiteScore, best_threshold, threshold_table


def _rows() -> list[SiteScore]:
    return [
        SiteScore("a", "liver", 0.9, "mass", "mass"),      # found, right type
        SiteScore("a", "spleen", 0.7, "cyst", "calcification"),  # found, wrong type
        SiteScore("b", "liver", 0.65, "cyst", None),       # false positive above 0.6
        SiteScore("b", "spleen", 0.1, "cyst", None),       # true negative
        SiteScore("c", "right_lung", 0.0, None, "nodule"),  # missed (site not read)
    ]


def test_threshold_table_counts_each_site_once():
    low, high = threshold_table(_rows(), [0.6, 0.8])
    assert low["n"] == 5 and low["threshold"] == 0.6
    assert low["recall"] == pytest.approx(2 / 3) and low["specificity"] == pytest.approx(1 / 2)
    assert low["accuracy"] == pytest.approx(3 / 5) and low["type_accuracy"] == pytest.approx(1 / 2)
    assert low["exact"] == pytest.approx(2 / 5)  # liver mass and the true negative
    assert low["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert high["recall"] == pytest.approx(1 / 3) and high["specificity"] == 1.0 and high["type_accuracy"] == 1.0
    assert high["exact"] == pytest.approx(3 / 5)
    assert best_threshold([low, high])["threshold"] == 0.8
    assert best_threshold([low, high], key="recall")["threshold"] == 0.6


def test_empty_groups_are_nan_not_errors():
    (row,) = threshold_table([SiteScore("a", "liver", 0.2, "cyst", None)], [0.5])
    assert math.isnan(row["recall"]) and row["specificity"] == 1.0 and math.isnan(row["type_accuracy"])


def test_ties_prefer_the_lower_threshold():
    table = [{"threshold": 0.7, "exact": 0.5}, {"threshold": 0.5, "exact": 0.5}]
    assert best_threshold(table)["threshold"] == 0.5
