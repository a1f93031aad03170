# Copyright (c) radfm3d contributors. Apache-2.0.
"""Negation-aware finding extraction and finding-level precision/recall/F1."""

from __future__ import annotations

import pytest

from radfm3d.evaluation.findings import case_scores, extract_findings, finding_figures


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No hemorrhage.", set()),
        ("Hemorrhage in the left hemisphere; no cyst.", {("hemorrhage", "brain", "left")}),
        ("No focal liver lesion.", set()),
        ("Without evidence of mass.", set()),
        ("Negative for nodule in the left lung.", set()),
        ("The hepatic cyst has resolved.", set()),
        ("The cyst is no longer seen.", set()),
        ("No hemorrhage or cyst.", set()),
        ("There is a 12 mm cyst in the right kidney and no hemorrhage.", {("cyst", "kidney", "right")}),
        ("A nodule in the right lung, but no nodule in the left lung.", {("nodule", "lung", "right")}),
        ("No change in the left lung nodule.", {("nodule", "lung", "left")}),
        ("Left renal cyst. Calcification in the spleen.",
         {("cyst", "kidney", "left"), ("calcification", "spleen", "none")}),
        ("Haemorrhage in the right cerebral hemisphere.", {("hemorrhage", "brain", "right")}),
        ("Hepatic cyst.", {("cyst", "liver", "none")}),
        ("", set()),
    ],
)
def test_extract_findings(text, expected):
    assert extract_findings(text) == expected


def test_has_vs_no_is_a_clinical_error():
    """n-gram overlap rewards 'no hemorrhage' vs 'hemorrhage'; the finding F1 does not."""
    s = case_scores(extract_findings("No hemorrhage in the left hemisphere."),
                    extract_findings("Hemorrhage in the left hemisphere."))
    assert s == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert case_scores(set(), set())["f1"] == 1.0  # a correct normal report


def test_finding_figures_micro_and_per_case():
    preds = ["Cyst in the left kidney. Nodule in the right lung.", "No hemorrhage.", "Hepatic cyst."]
    refs = ["Cyst in the left kidney.", "Hemorrhage in the left hemisphere.", "Hepatic cyst."]
    figs, cases = finding_figures(preds, refs)
    # tp = 1 + 0 + 1, fp = 1 + 0 + 0, fn = 0 + 1 + 0
    assert figs["finding_precision"].value == pytest.approx(2 / 3)
    assert figs["finding_recall"].value == pytest.approx(2 / 3)
    assert figs["finding_f1"].value == pytest.approx(2 / 3)
    assert [c["f1"] for c in cases] == pytest.approx([2 / 3, 0.0, 1.0])
    assert figs["finding_f1_per_case"].value == pytest.approx(5 / 9)
    for f in figs.values():
        assert f.low <= f.value <= f.high


def test_vocabulary_follows_a_label_schema():
    from radfm3d.evaluation.findings import extract_findings, load_vocabulary

    schema = {"name": "mine", "finding_types": [{"name": "ground_glass", "phrase": " ground-glass opacity"}],
              "structures": [{"name": "left_adrenal", "case": "adrenal/left"}]}
    text = "There is a ground-glass opacity in the left adrenal."
    assert extract_findings(text) == set()
    vocab = load_vocabulary(schema)
    assert extract_findings(text, vocab) == {("ground glass", "adrenal", "left")}
    assert "mine" in vocab.source and load_vocabulary(schema) is vocab  # cached by content
