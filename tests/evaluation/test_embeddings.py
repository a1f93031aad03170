# Copyright (c) radfm3d contributors. Apache-2.0.
"""Embedding-model scoring: AUROC and its bootstrap against scikit-learn, grouped retrieval on hand-made embeddings,
participation ratio of known spectra, the linear probe, the embeddings file and its errors, and the written report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from radfm3d.errors import RadFM3DInputError
from radfm3d.evaluation import embeddings as E


def test_auroc_matches_sklearn_with_ties_unknowns_and_undefined_classes():
    rng = np.random.default_rng(0)
    n = 60
    labels = rng.integers(0, 2, size=(n, 3)).astype(np.int8)
    labels[:10, 1] = -1  # unknown labels are left out of that class
    labels[:, 2] = 0  # one label value: undefined, not 0.5
    scores = rng.integers(0, 5, size=(n, 3)).astype(float)  # many ties
    res = E.auroc_figures(labels, scores, ["a", "b", "c"], n_resamples=40, seed=3)
    for k, name in enumerate("ab"):
        known = labels[:, k] >= 0
        assert res["per_class"][name]["value"] == pytest.approx(roc_auc_score(labels[known, k], scores[known, k]))
        assert res["per_class"][name]["n"] == int(known.sum())
    assert res["per_class"]["c"]["undefined"].startswith("labels take one value")
    assert "value" not in res["per_class"]["c"]
    assert res["defined"] == ["a", "b"] and res["undefined"] == ["c"]
    point_a, point_b = res["per_class"]["a"]["value"], res["per_class"]["b"]["value"]
    assert res["mean"]["value"] == pytest.approx((point_a + point_b) / 2)
    # the interval: percentiles of scikit-learn's weighted AUROC over the same resamples
    counts = E._resample_counts(n, 40, 3)
    boot_a = [roc_auc_score(labels[:, 0], scores[:, 0], sample_weight=c) for c in counts]
    known = labels[:, 1] >= 0
    boot_b = [roc_auc_score(labels[known, 1], scores[known, 1], sample_weight=c[known]) for c in counts]
    assert res["per_class"]["a"]["low"] == pytest.approx(np.percentile(boot_a, 2.5))
    assert res["per_class"]["a"]["high"] == pytest.approx(np.percentile(boot_a, 97.5))
    assert res["mean"]["low"] == pytest.approx(np.percentile((np.array(boot_a) + boot_b) / 2, 2.5))
    assert res["per_class"]["a"]["low"] <= point_a <= res["per_class"]["a"]["high"]


def test_perfect_and_reversed_scores():
    y = np.array([[0], [0], [1], [1]])
    assert E.auroc_figures(y, np.array([[0.1], [0.2], [0.8], [0.9]]), ["x"], n_resamples=10)["mean"]["value"] == 1.0
    assert E.auroc_figures(y, -np.array([[0.1], [0.2], [0.8], [0.9]]), ["x"], n_resamples=10)["mean"]["value"] == 0.0


def test_stratified_auroc_by_hand_and_per_stratum_sklearn():
    # stratum A: pos 0.9, 0.2; neg 0.5, 0.2 -> pairs (0.9>0.5) 1, (0.9>0.2) 1, (0.2<0.5) 0, (0.2=0.2) 0.5 = 2.5 / 4
    # stratum B: pos 0.1; neg 0.3, 0.0 -> 0 + 1 = 1 / 2; stratum C: only negatives, no pairs
    labels = np.array([[1], [1], [0], [0], [1], [0], [0], [0], [-1]])
    scores = np.array([[0.9], [0.2], [0.5], [0.2], [0.1], [0.3], [0.0], [5.0], [9.0]])
    strata = ["A", "A", "A", "A", "B", "B", "B", "C", "A"]
    res = E.stratified_auroc_figures(labels, scores, strata, ["x"], n_resamples=40, seed=1)
    f = res["per_class"]["x"]
    assert f["value"] == pytest.approx((2.5 + 1) / (4 + 2))
    assert f["strata"] == ["A", "B"] and f["n"] == 7 and f["positives"] == 3
    assert f["low"] <= f["value"] <= f["high"]
    # pair-weighted pooling of each stratum's scikit-learn AUROC
    a, b = slice(0, 4), slice(4, 7)
    pooled = 4 * roc_auc_score(labels[a, 0], scores[a, 0]) + 2 * roc_auc_score(labels[b, 0], scores[b, 0])
    assert f["value"] == pytest.approx(pooled / 6)
    # the interval: the same resampled records as the plain AUROC (pairs and correct pairs summed over strata)
    counts = E._resample_counts(9, 40, 1)
    boot = []
    for c in counts:
        num = den = 0.0
        for rows in (a, b):
            y, s, w = labels[rows, 0], scores[rows, 0], c[rows]
            pairs = w[y == 1].sum() * w[y == 0].sum()
            if pairs > 0:
                num += roc_auc_score(y, s, sample_weight=w) * pairs
                den += pairs
        boot.append(num / den if den else np.nan)
    assert f["low"] == pytest.approx(np.nanpercentile(boot, 2.5))
    assert f["high"] == pytest.approx(np.nanpercentile(boot, 97.5))


def test_stratified_auroc_one_stratum_equals_sklearn_and_region_scores_are_chance():
    rng = np.random.default_rng(2)
    n = 50
    labels = rng.integers(0, 2, size=(n, 2)).astype(np.int8)
    scores = rng.integers(0, 4, size=(n, 2)).astype(float)
    one = E.stratified_auroc_figures(labels, scores, ["all"] * n, ["a", "b"], n_resamples=30, seed=4)
    plain = E.auroc_figures(labels, scores, ["a", "b"], n_resamples=30, seed=4)
    for k, name in enumerate("ab"):
        assert one["per_class"][name]["value"] == pytest.approx(roc_auc_score(labels[:, k], scores[:, k]))
        assert one["per_class"][name]["low"] == pytest.approx(plain["per_class"][name]["low"])
    assert one["mean"]["value"] == pytest.approx(plain["mean"]["value"])
    # a finding only in the head, scored by "is this the head": plain AUROC high, within region 0.5
    region = np.array(["head"] * 20 + ["abdomen"] * 20)
    y = np.zeros((40, 2), np.int8)
    y[:8, 0] = 1  # class 0: 8 of the 20 heads
    y[:, 1] = 0  # class 1: never present -> undefined with the reason
    s = np.stack([(region == "head").astype(float), np.zeros(40)], axis=1)
    # plain: 8 positives (score 1) over 20 abdomen negatives (0) won, over 12 head negatives (1) tied: 26 / 32
    assert E.auroc_figures(y, s, ["h", "z"], n_resamples=20)["per_class"]["h"]["value"] == pytest.approx(26 / 32)
    st = E.stratified_auroc_figures(y, s, region, ["h", "z"], n_resamples=20)
    assert st["per_class"]["h"]["value"] == 0.5 and st["per_class"]["h"]["strata"] == ["head"]
    assert st["per_class"]["z"]["undefined"].startswith("no stratum holds both label values")
    assert st["defined"] == ["h"] and st["mean"]["value"] == 0.5


def _retrieval_case():
    e1, e2, e3 = np.eye(3)
    texts = ["Report A.", "report  a.", "Report B.", "Report C."]  # the first two are one report after normalising
    text_embeds = np.stack([e1, e1, e2, e3])
    image_embeds = np.stack([e1, e2, e2, 0.8 * e1 + 0.6 * e3])
    return image_embeds, text_embeds, texts


def test_retrieval_groups_identical_reports_exact_recalls():
    image_embeds, text_embeds, texts = _retrieval_case()
    res = E.retrieval_figures(image_embeds, text_embeds, texts, ks=(1, 2), n_resamples=20)
    assert res["n_unique_reports"] == 3 and res["n_images"] == 4
    i2r, r2i = res["image_to_report"], res["report_to_image"]
    # image ranks of the true report: 0, 2 (ties count against), 0, 1
    assert i2r["R@1"]["value"] == pytest.approx(0.5)
    assert i2r["R@2"]["value"] == pytest.approx(0.75)
    assert i2r["chance@1"] == pytest.approx(1 / 3) and i2r["chance@2"] == pytest.approx(2 / 3)
    # unique reports: A is found by image 0, B ties with image 1 (counts against), C is found by image 3
    assert r2i["R@1"]["value"] == pytest.approx(2 / 3) and r2i["R@1"]["n"] == 3
    assert r2i["R@2"]["value"] == pytest.approx(1.0)
    assert r2i["chance@1"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    assert r2i["chance@2"] == pytest.approx((5 / 6 + 0.5 + 0.5) / 3)
    # blind: always the most frequent reports first (A, then B, then C)
    assert i2r["blind@1"]["value"] == pytest.approx(0.5) and i2r["blind@2"]["value"] == pytest.approx(0.75)
    # with training reports C, C, C, A: the gallery in the order C, A, B (B unseen, last)
    trained = E.retrieval_figures(image_embeds, text_embeds, texts, ks=(1, 2), n_resamples=20,
                                  prior_texts=["Report C."] * 3 + ["REPORT A."])
    assert trained["image_to_report"]["blind@1"]["value"] == pytest.approx(0.25)
    assert trained["image_to_report"]["blind@2"]["value"] == pytest.approx(0.75)
    assert trained["image_to_report"]["R@1"] == i2r["R@1"]


def test_retrieval_within_stratum_exact_recalls():
    image_embeds, text_embeds, texts = _retrieval_case()
    # strata x: images 0 (report A), 2 (B); y: images 1 (A), 3 (C) -> candidates in x: A, B; in y: A, C
    res = E.retrieval_figures(image_embeds, text_embeds, texts, ks=(1, 2), n_resamples=20,
                              strata=["x", "y", "x", "y"])
    within = res["within_stratum"]
    assert within["n_strata"] == 2
    i2r, r2i = within["image_to_report"], within["report_to_image"]
    # image 0: A 1, B 0 -> rank 0; image 1 (e2): A 0, C 0 tie -> rank 1; image 2: B 1, A 0 -> rank 0;
    # image 3: A 0.8, C 0.6 -> rank 1
    assert i2r["R@1"]["value"] == pytest.approx(0.5) and i2r["R@2"]["value"] == pytest.approx(1.0)
    assert i2r["chance@1"] == pytest.approx(0.5) and i2r["chance@2"] == pytest.approx(1.0)
    # (report, stratum) pairs: (A, x) hit, (B, x) hit, (A, y): image 1 scores 0 < image 3's 0.8 -> miss at 1,
    # (C, y): image 3 (0.6) above image 1 (0) -> hit
    assert r2i["R@1"]["value"] == pytest.approx(0.75) and r2i["R@1"]["n"] == 4
    assert r2i["R@2"]["value"] == pytest.approx(1.0) and r2i["chance@1"] == pytest.approx(0.5)
    # a model that only tells the strata apart: perfect plain recall, chance within stratum
    rng = np.random.default_rng(0)
    region = np.repeat(np.eye(3), 10, axis=0)  # 30 images of 3 regions, one unique report each
    noise = rng.normal(size=(30, 8))
    images = np.concatenate([region * 5, noise], axis=1)
    reports = np.concatenate([region * 5, rng.normal(size=(30, 8))], axis=1)
    res = E.retrieval_figures(images, reports, [f"r{i}" for i in range(30)], n_resamples=20,
                              strata=[f"s{i // 10}" for i in range(30)])
    assert res["image_to_report"]["R@10"]["value"] > 0.25  # region recognition lifts the plain recall (chance 1/3)
    assert abs(res["within_stratum"]["image_to_report"]["R@1"]["value"] - 0.1) < 0.2
    assert res["within_stratum"]["image_to_report"]["chance@1"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="strata: expected 30"):
        E.stratified_retrieval_figures(np.zeros((30, 30)), np.arange(30), ["a"] * 29)


def test_retrieval_of_matching_embeddings_is_perfect():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 16))
    res = E.retrieval_figures(x, x + 0.01 * rng.normal(size=x.shape), [f"r{i}" for i in range(30)], n_resamples=10)
    assert res["image_to_report"]["R@1"]["value"] == 1.0 and res["report_to_image"]["R@1"]["value"] == 1.0
    assert res["image_to_report"]["chance@1"] == pytest.approx(1 / 30)


@pytest.mark.parametrize("d", [4, 10])
def test_participation_ratio_of_known_spectra(d):
    iso = np.concatenate([np.eye(d), -np.eye(d)]) * 3.0  # isotropic covariance after centring
    res = E.effective_dimensionality(iso)
    assert res["participation_ratio"] == pytest.approx(d)
    assert res["components_90"] == int(np.ceil(0.9 * d - 1e-9))
    v = np.arange(1, d + 1, dtype=float)
    rank1 = np.stack([v, -v, 2 * v, -0.5 * v])  # one line through the origin: unit vectors +-v/|v|
    res1 = E.effective_dimensionality(rank1)
    assert res1["participation_ratio"] == pytest.approx(1.0)
    assert res1["components_90"] == 1


def test_linear_probe_above_chance_on_separable_data():
    rng = np.random.default_rng(0)

    def data(n):
        x = rng.normal(size=(n, 8))
        y = np.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0), np.zeros(n, bool)], axis=1).astype(np.int8)
        return x, y

    xtr, ytr = data(200)
    xte, yte = data(80)
    yte[:, 2] = rng.integers(0, 2, size=80)  # test has both values but training only one: not fitted
    res = E.linear_probe(xtr, ytr, xte, yte, ["a", "b", "c"], n_resamples=50)
    assert res["per_class"]["a"]["value"] > 0.9 and res["per_class"]["b"]["value"] > 0.85
    assert res["per_class"]["a"]["low"] > 0.5
    assert "training labels take one value" in res["per_class"]["c"]["undefined"]
    assert res["defined"] == ["a", "b"] and res["n_train"] == 200


def _arrays(n=5, p=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return dict(record_ids=np.array([f"r{i}" for i in range(n)]), image_embeds=rng.normal(size=(n, p)),
                report_texts=np.array([f"text {i % 3}" for i in range(n)]), text_embeds=rng.normal(size=(n, p)),
                class_names=np.array([f"c{j}" for j in range(k)]), zero_shot_scores=rng.normal(size=(n, k)),
                labels=rng.integers(-1, 2, size=(n, k)).astype(np.int8),
                report_zero_shot_scores=rng.normal(size=(n, k)))


def test_embeddings_file_round_trip(tmp_path):
    path = E.save_embeddings(tmp_path / "emb.npz", **_arrays())
    e = E.load_embeddings(path)
    ref = _arrays()
    assert e.record_ids.tolist() == ref["record_ids"].tolist()
    assert np.allclose(e.image_embeds, ref["image_embeds"]) and e.labels.dtype == np.int8
    assert np.allclose(e.report_zero_shot_scores, ref["report_zero_shot_scores"])
    with np.load(path, allow_pickle=False) as npz:  # plain arrays, readable without pickle
        assert npz["report_texts"].dtype.kind == "U"
    sub = e.subset(["r3", "r1"])
    assert sub.record_ids.tolist() == ["r3", "r1"] and np.allclose(sub.image_embeds, ref["image_embeds"][[3, 1]])
    assert sub.class_names.tolist() == ["c0", "c1"] and sub.strata is None
    path = E.save_embeddings(tmp_path / "strata.npz", **_arrays(), strata=np.array(["a", "b", "a", "b", "c"]))
    e = E.load_embeddings(path)
    assert e.strata.tolist() == ["a", "b", "a", "b", "c"] and e.subset(["r4", "r0"]).strata.tolist() == ["c", "a"]


def _write_raw(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


@pytest.mark.parametrize("change, words", [
    (lambda a: a.pop("image_embeds"), "missing array(s) ['image_embeds']"),
    (lambda a: a.update(text_embeds=np.zeros((5, 3))), "'text_embeds' must have shape (5, 4)"),
    (lambda a: a.update(record_ids=np.array(["a", "a", "b", "c", "d"])), "'record_ids' repeats ids ['a']"),
    (lambda a: a["image_embeds"].__setitem__((2, 1), np.nan), "'image_embeds' has NaN/inf values in 1 row(s) "
                                                              "(first: row 2)"),
    (lambda a: a.update(labels=np.full((5, 2), 2, np.int8)), "'labels' may hold only 1"),
    (lambda a: a.update(labels=np.zeros((5, 2), np.float32)), "'labels' must be integers"),
    (lambda a: a.pop("class_names"), "need the array 'class_names'"),
    (lambda a: a.update(report_zero_shot_scores=np.zeros((5, 3))), "'report_zero_shot_scores' must have shape (5, 2)"),
    (lambda a: a.update(report_texts=np.arange(5)), "'report_texts' must hold strings"),
    (lambda a: a.update(report_texts=np.array(["x"] * 4)), "'report_texts' has 4 rows"),
    (lambda a: a.update(strata=np.array(["x"] * 4)), "'strata' has 4 rows"),
    (lambda a: a.update(strata=np.arange(5)), "'strata' must hold strings"),
])
def test_bad_embeddings_files_name_file_and_array(tmp_path, change, words):
    arrays = _arrays()
    change(arrays)
    path = _write_raw(tmp_path / "bad.npz", **arrays)
    with pytest.raises(RadFM3DInputError) as err:
        E.load_embeddings(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_unreadable_embeddings_files(tmp_path):
    with pytest.raises(RadFM3DInputError, match="embeddings file not found"):
        E.load_embeddings(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(RadFM3DInputError, match="text.npz"):
        E.load_embeddings(tmp_path / "text.npz")
    arrays = _arrays()
    arrays["report_texts"] = np.array(list(arrays["report_texts"]), dtype=object)  # needs pickle
    path = _write_raw(tmp_path / "obj.npz", **arrays)
    with pytest.raises(RadFM3DInputError, match="array 'report_texts' cannot be read without pickle"):
        E.load_embeddings(path)


def test_two_models_one_table_and_written_report(tmp_path):
    rng = np.random.default_rng(0)
    n, p = 40, 8
    labels = rng.integers(0, 2, size=(n, 2)).astype(np.int8)
    texts = np.array([f"report {int(l0)} {int(l1)}" for l0, l1 in labels])
    text_embeds = rng.normal(size=(4, p))[labels[:, 0] * 2 + labels[:, 1]]
    good = E.Embeddings(np.array([f"r{i}" for i in range(n)]), text_embeds + 0.1 * rng.normal(size=(n, p)), texts,
                        text_embeds, np.array(["x", "y"]), labels + 0.1 * rng.normal(size=(n, 2)), labels,
                        report_zero_shot_scores=labels.astype(float))
    noise = E.Embeddings(good.record_ids, rng.normal(size=(n, p)), texts, text_embeds, good.class_names,
                         rng.normal(size=(n, 2)), labels)
    good.strata = np.array(["s0", "s1"] * (n // 2))
    results, curves = E.evaluate_models({"good": (good, good), "noise": (noise, None)}, n_resamples=50,
                                        meta={"stratify_by": "region"})
    g, z = results["models"]["good"], results["models"]["noise"]
    assert g["zero_shot"]["stratified"]["mean"]["value"] > 0.95 and g["probe"]["stratified"]["mean"]["value"] > 0.9
    assert g["n_strata"] == 2 and "stratified" not in z["zero_shot"]
    assert g["zero_shot"]["mean"]["value"] > 0.95 and g["retrieval"]["image_to_report"]["R@1"]["value"] == 1.0
    assert g["probe"]["mean"]["value"] > 0.9 and z["probe"] is None
    assert g["zero_shot"]["report_text"]["mean"]["value"] == 1.0 and "report_text" not in z["zero_shot"]
    assert any("linear probe" in note for note in z["notes"])
    paths = E.write_results(results, curves, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["models"]) == {"good", "noise"}
    md = (tmp_path / "report.md").read_text()
    assert md.count("| good |") == 1 and md.count("| noise |") == 1
    assert "zero-shot within stratum" in md and "pairs of records with the same region (2 strata)" in md
    row = next(line for line in md.splitlines() if line.startswith("| good |")).split(" | ")
    assert row[3].startswith(f"{g['zero_shot']['stratified']['mean']['value']:.3f}")  # the within-stratum column
    assert "stratified" in saved["models"]["good"]["probe"]
    for name in ("recall_at_k", "spectrum", "roc_good"):
        assert paths[name].is_file() and paths[name].stat().st_size > 1000


def test_localisation_and_structure_rows():
    e1, e2, e3 = np.eye(3)
    # series a#0 has two regions (left, right); series b#0 has one (nothing to choose: left out)
    regions = np.stack([e1, e1, e2, e3])
    sentences = np.stack([e1, 0.5 * e1 + e2, e2, e3])  # row 1 points at the wrong region, row 2 at its own
    series = ["a#0", "a#0", "a#0", "b#0"]
    keys = ["left", "left", "right", "only"]
    loc = E.localisation_figure(regions, sentences, series, keys, n_resamples=20)
    assert loc["accuracy"]["value"] == pytest.approx(2 / 3) and loc["accuracy"]["n"] == 3
    assert loc["chance"] == pytest.approx(0.5) and loc["n_series"] == 1
    arrays = {**_arrays(n=2, p=3), "record_ids": np.array(["a", "b"]),
              "structure_series": np.array(series), "structure_regions": np.array(keys),
              "structure_texts": np.array(["l", "l2", "r", "o"]), "structure_embeds": regions,
              "structure_text_embeds": sentences}
    e = E.Embeddings(**arrays)
    st = E.structure_figures(e, n_resamples=20)
    assert st["n_rows"] == 4 and st["localisation"]["accuracy"]["value"] == pytest.approx(2 / 3)
    assert st["retrieval"]["n_unique_reports"] == 4
    sub = e.subset(["b"])  # the structure rows of the kept records only
    assert sub.structure_series.tolist() == ["b#0"] and np.allclose(sub.structure_embeds, [e3])
    arrays.pop("structure_texts")
    with pytest.raises(RadFM3DInputError, match="need all of"):
        E.Embeddings(**arrays)


def test_structure_zero_shot_scores_nan_means_not_scored():
    n = 8
    labels = np.array([[1], [0], [1], [0], [1], [0], [1], [0]], dtype=np.int8)
    organ = np.array([[2.0], [-1.0], [3.0], [-2.0], [np.nan], [np.nan], [np.nan], [np.nan]])
    e = E.Embeddings(np.array([f"r{i}" for i in range(n)]), np.eye(n), np.array(["t"] * n),
                     class_names=np.array(["c"]), zero_shot_scores=np.zeros((n, 1)), labels=labels,
                     structure_zero_shot_scores=organ)
    res = E.score_embeddings(e, n_resamples=20)
    figure = res["zero_shot"]["structure"]["per_class"]["c"]
    assert figure["value"] == 1.0 and figure["n"] == 4  # only the four records with a region are ranked
    assert res["zero_shot"]["per_class"]["c"]["value"] == 0.5
    row = next(line for line in E.comparison_table({"m": res}) if line.startswith("| m |")).split(" | ")
    assert row[4].startswith("1.000")
    with pytest.raises(RadFM3DInputError, match="structure_zero_shot_scores.*inf"):
        E.Embeddings(e.record_ids, e.image_embeds, e.report_texts, class_names=e.class_names,
                     structure_zero_shot_scores=np.full((n, 1), np.inf))
    with pytest.raises(RadFM3DInputError, match="NaN/inf"):
        E.Embeddings(e.record_ids, e.image_embeds, e.report_texts, class_names=e.class_names,
                     zero_shot_scores=organ)
