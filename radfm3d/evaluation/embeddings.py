# Copyright (c) radfm3d contributors. Apache-2.0.
"""Scoring of image-report embedding models (CLIP-style) from an embeddings file, with numpy and scikit-learn only.

Any embedding model is scored by the same code: it writes an embeddings file (:func:`save_embeddings`), and
:func:`evaluate_embeddings` scores it against a manifest. The file is ``np.savez`` (``allow_pickle=False``; strings as
``'<U'`` arrays) holding

=================== =========== =================================================================================
array               shape       meaning
=================== =========== =================================================================================
record_ids          (N,) str    manifest record ids (unique)
image_embeds        (N, P)      one image (or fused study) embedding per record
report_texts        (N,) str    the record's report (its ``answer``)
text_embeds         (N, P)      the report's text embedding (optional: without it there is no retrieval)
class_names         (K,) str    zero-shot / probe classes (optional)
zero_shot_scores    (N, K)      a score per class, higher = more likely present (optional; needs class_names)
report_zero_shot_   (N, K)      the same class scores computed from the report's text embedding instead of the
scores                          image's: the text-side ceiling of the prompts (optional; needs class_names)
labels              (N, K) int8 1 present, 0 absent, -1 unknown (optional; needs class_names)
structure_zero_     (N, K)      the class scores computed on the region embedding of the class's structure (the
shot_scores                     highest over its regions and series) instead of the whole scan's; NaN where the
                                record has no region of that structure (optional; needs class_names)
strata              (N,) str    each record's stratum, e.g. its body region (optional): the stratified AUROC
                                compares only records of one stratum
=================== =========== =================================================================================

and optionally the structure level, one row per (report sentence, series that sees its structure):

=================== =========== =================================================================================
structure_series    (R,) str    the series the region is on: ``"<record id>#<series index>"``
structure_regions   (R,) str    the region within that series (rows with equal series and region are one region,
                                e.g. the box as text)
structure_texts     (R,) str    the report sentence
structure_embeds    (R, P)      the region's embedding (features pooled inside the structure's box)
structure_text_     (R, P)      the sentence's embedding
embeds
=================== =========== =================================================================================

Figures (each a :class:`~radfm3d.evaluation.metrics.Figure` with a seeded percentile bootstrap 95% interval):

- zero-shot AUROC per class and their mean (one joint bootstrap over records); a class whose evaluated labels take
  one value has no AUROC and is reported as undefined (never 0.5);
- with ``structure_zero_shot_scores``, the same AUROC on the structure regions' scores, over the records that have
  a region of the class's structure (an organ-level zero-shot as in fVLM; the regions come from boxes or masks of
  the structures, e.g. a segmentation, never from the finding);
- with ``strata``, the stratified AUROC of the zero-shot and linear-probe scores: per class the fraction of
  positive-negative pairs within one stratum that are ordered correctly (ties one half), i.e. Mann-Whitney counted
  only inside strata, with the same joint bootstrap. A score that only tells strata apart (e.g. body regions, when
  each finding belongs to one region) gets 0.5 here however high its plain AUROC; undefined when no stratum holds
  both label values;
- retrieval R@1/5/10 with identical reports grouped (texts equal after lower-casing and collapsing whitespace):
  image->report ranks the unique reports (a hit when the true report is in the top k), report->image ranks every
  image for each unique report (a hit when any image with that report is in the top k); each beside its chance
  level (a random ranking) and, for image->report, the blind baseline that always ranks the most frequent reports
  first; with ``strata`` also within stratum (only candidates of the query's stratum compete), where recognising
  the stratum alone is at chance;
- effective dimensionality of the L2-normalised embeddings: participation ratio ``(sum l)^2 / sum l^2`` of the
  covariance eigenvalues ``l`` and the number of components holding 90% of the variance;
- a linear probe: per class a scikit-learn ``LogisticRegression`` fitted on training-record embeddings, AUROC on
  the evaluated records (the blind baseline of every AUROC is a constant score, 0.5);
- the structure level (when the file has it): sentence<->region retrieval over every region of the evaluated
  records, identical sentences grouped as reports are, and localisation: for each sentence, whether its own region
  scores highest among the distinct regions of its series (chance: one over their number).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from radfm3d.errors import RadFM3DInputError
from radfm3d.evaluation.metrics import BOOTSTRAP_SEED, N_RESAMPLES, Figure, _percentiles, bootstrap_figure
from radfm3d.utils import atomic_savefig, atomic_write

__all__ = [
    "Embeddings", "save_embeddings", "load_embeddings", "normalize_report", "auroc_figures", "retrieval_figures",
    "stratified_retrieval_figures",
    "stratified_auroc_figures", "effective_dimensionality", "linear_probe", "score_embeddings", "comparison_table",
    "markdown_report",
    "write_plots", "evaluate_models", "write_results", "KS",
]

KS = (1, 5, 10)
REQUIRED = ("record_ids", "image_embeds", "report_texts")
STRUCTURE = ("structure_series", "structure_regions", "structure_texts", "structure_embeds", "structure_text_embeds")
OPTIONAL = ("text_embeds", "class_names", "zero_shot_scores", "labels", "report_zero_shot_scores",
            "structure_zero_shot_scores", "strata") + STRUCTURE


# ------------------------------------------------------------------------------------------ embeddings file
@dataclasses.dataclass
class Embeddings:
    """The arrays of an embeddings file (see the module docstring); ``source`` names where they came from."""

    record_ids: np.ndarray
    image_embeds: np.ndarray
    report_texts: np.ndarray
    text_embeds: np.ndarray | None = None
    class_names: np.ndarray | None = None
    zero_shot_scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    report_zero_shot_scores: np.ndarray | None = None
    structure_zero_shot_scores: np.ndarray | None = None
    strata: np.ndarray | None = None
    structure_series: np.ndarray | None = None
    structure_regions: np.ndarray | None = None
    structure_texts: np.ndarray | None = None
    structure_embeds: np.ndarray | None = None
    structure_text_embeds: np.ndarray | None = None
    source: str = "<embeddings>"

    def __post_init__(self) -> None:
        _validate(self)

    def __len__(self) -> int:
        return int(self.record_ids.shape[0])

    def subset(self, ids: Sequence[str]) -> "Embeddings":
        """The rows of ``ids`` (in that order; every id must be present)."""
        index = {r: i for i, r in enumerate(self.record_ids.tolist())}
        rows = np.array([index[str(r)] for r in ids], dtype=np.int64)
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update({name: value[rows] for name, value in out.items()
                    if isinstance(value, np.ndarray) and name != "class_names" and name not in STRUCTURE})
        if self.structure_series is not None:  # the structure rows of the kept records
            wanted = {str(r) for r in ids}
            keep = np.array([s.rsplit("#", 1)[0] in wanted for s in self.structure_series.tolist()], dtype=bool)
            out.update({name: getattr(self, name)[keep] for name in STRUCTURE})
        return Embeddings(**out)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in REQUIRED + OPTIONAL if getattr(self, name) is not None}


def _as_str_array(value: Any, name: str, source: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind == "S":
        arr = arr.astype(str)
    if arr.dtype.kind != "U" and not (arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.ravel())):
        raise RadFM3DInputError(source, f"array {name!r} must hold strings ('<U'), got dtype {arr.dtype}")
    arr = arr.astype(str)
    if arr.ndim != 1:
        raise RadFM3DInputError(source, f"array {name!r} must be 1-D, got shape {arr.shape}")
    return arr


def _as_float_matrix(value: Any, name: str, source: str, n: int, width: int | None = None,
                     allow_nan: bool = False) -> np.ndarray:
    """A numeric ``(n, width)`` array, finite (``allow_nan``: NaN marks a missing value; inf is still refused)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise RadFM3DInputError(source, f"array {name!r} must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] != n or (width is not None and arr.shape[1] != width):
        want = f"({n}, {width if width is not None else 'P'})"
        raise RadFM3DInputError(source, f"array {name!r} must have shape {want}, got {arr.shape}")
    bad = ~(np.isfinite(arr) | (np.isnan(arr) if allow_nan else False)).all(axis=1)
    if bad.any():
        what = "inf" if allow_nan else "NaN/inf"
        raise RadFM3DInputError(source, f"array {name!r} has {what} values in {int(bad.sum())} row(s) "
                                        f"(first: row {int(np.argmax(bad))})")
    return arr.astype(np.float32) if arr.dtype != np.float64 else arr


def _validate(e: Embeddings) -> None:
    src = e.source
    e.record_ids = _as_str_array(e.record_ids, "record_ids", src)
    n = e.record_ids.shape[0]
    if n == 0:
        raise RadFM3DInputError(src, "array 'record_ids' is empty")
    dup = [r for r, c in Counter(e.record_ids.tolist()).items() if c > 1]
    if dup:
        raise RadFM3DInputError(src, f"array 'record_ids' repeats ids {dup[:5]}")
    e.image_embeds = _as_float_matrix(e.image_embeds, "image_embeds", src, n)
    e.report_texts = _as_str_array(e.report_texts, "report_texts", src)
    if e.report_texts.shape[0] != n:
        raise RadFM3DInputError(src, f"array 'report_texts' has {e.report_texts.shape[0]} rows, record_ids {n}")
    if e.text_embeds is not None:
        e.text_embeds = _as_float_matrix(e.text_embeds, "text_embeds", src, n, e.image_embeds.shape[1])
    if e.strata is not None:
        e.strata = _as_str_array(e.strata, "strata", src)
        if e.strata.shape[0] != n:
            raise RadFM3DInputError(src, f"array 'strata' has {e.strata.shape[0]} rows, record_ids {n}")
    _validate_structures(e)
    if e.class_names is None:
        extra = [k for k in ("zero_shot_scores", "labels", "report_zero_shot_scores", "structure_zero_shot_scores")
                 if getattr(e, k) is not None]
        if extra:
            raise RadFM3DInputError(src, f"arrays {extra} need the array 'class_names' (K,)")
        return
    e.class_names = _as_str_array(e.class_names, "class_names", src)
    k = e.class_names.shape[0]
    if len(set(e.class_names.tolist())) != k:
        raise RadFM3DInputError(src, "array 'class_names' repeats names")
    for name in ("zero_shot_scores", "report_zero_shot_scores"):
        if getattr(e, name) is not None:
            setattr(e, name, _as_float_matrix(getattr(e, name), name, src, n, k))
    if e.structure_zero_shot_scores is not None:
        e.structure_zero_shot_scores = _as_float_matrix(e.structure_zero_shot_scores, "structure_zero_shot_scores",
                                                        src, n, k, allow_nan=True)
    if e.labels is not None:
        lab = np.asarray(e.labels)
        if lab.dtype.kind not in "iub" or lab.shape != (n, k):
            raise RadFM3DInputError(src, f"array 'labels' must be integers of shape ({n}, {k}), got {lab.dtype} "
                                         f"{lab.shape}")
        if not np.isin(lab, (-1, 0, 1)).all():
            raise RadFM3DInputError(src, "array 'labels' may hold only 1 (present), 0 (absent), -1 (unknown)")
        e.labels = lab.astype(np.int8)


def _validate_structures(e: Embeddings) -> None:
    given = [name for name in STRUCTURE if getattr(e, name) is not None]
    if not given:
        return
    if len(given) != len(STRUCTURE):
        raise RadFM3DInputError(e.source, f"structure arrays {given} need all of {list(STRUCTURE)}")
    src = e.source
    for name in ("structure_series", "structure_regions", "structure_texts"):
        setattr(e, name, _as_str_array(getattr(e, name), name, src))
    r = e.structure_series.shape[0]
    for name in ("structure_regions", "structure_texts"):
        if getattr(e, name).shape[0] != r:
            raise RadFM3DInputError(src, f"array {name!r} has {getattr(e, name).shape[0]} rows, structure_series {r}")
    p = e.image_embeds.shape[1]
    e.structure_embeds = _as_float_matrix(e.structure_embeds, "structure_embeds", src, r, p)
    e.structure_text_embeds = _as_float_matrix(e.structure_text_embeds, "structure_text_embeds", src, r, p)


def save_embeddings(path: str | os.PathLike, embeddings: Embeddings | None = None, **arrays: Any) -> Path:
    """Write an embeddings file (``np.savez``, atomically) from an :class:`Embeddings` or its arrays by name;
    the arrays are validated first. -> the path."""
    e = embeddings if embeddings is not None else Embeddings(**arrays, source=str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would add '.npz' to the temporary name
            np.savez(fh, **e.arrays())

    atomic_write(path, write)
    return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read and validate an embeddings file; RadFM3DInputError names the file and the bad array."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise RadFM3DInputError(path, "embeddings file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise RadFM3DInputError(path, "is a single .npy array, not an embeddings .npz (np.savez) file")
            names = list(npz.files)
            missing = [k for k in REQUIRED if k not in names]
            if missing:
                raise RadFM3DInputError(path, f"missing array(s) {missing}; it holds {names}")
            arrays = {}
            for k in REQUIRED + OPTIONAL:
                if k in names:
                    try:
                        arrays[k] = npz[k]
                    except ValueError as err:  # object arrays need pickle, which is refused
                        raise RadFM3DInputError(path, f"array {k!r} cannot be read without pickle ({err}); store "
                                                      "strings as '<U' arrays and numbers as numeric arrays") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise RadFM3DInputError(path, f"not a readable .npz file ({type(err).__name__}: {err})") from None
    except ValueError as err:  # e.g. a pickled .npy
        raise RadFM3DInputError(path, f"not an embeddings .npz file ({err})") from None
    return Embeddings(**arrays, source=str(path))


# ----------------------------------------------------------------------------------------------- AUROC
def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of ``scores`` and the start index of each run of equal scores in that order."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def _weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC (ties count one half, as scikit-learn's trapezoids) with case weights.

    scores, labels: (n,); weights: (B, n) non-negative case counts (a bootstrap resample per row) -> (B,),
    NaN where a row has no positive or no negative weight. Vectorised over resamples: cases are sorted once and
    the weights summed per group of tied scores, which scikit-learn's per-call API cannot do.
    """
    return _pair_ratio(*_weighted_pairs(scores, labels, weights))


def _pair_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` per resample, NaN where there is no positive-negative pair (``den`` 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _weighted_pairs(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(correctly ordered positive-negative pairs, ties one half; all positive-negative pairs), each (B,), weighted
    by the case counts ``weights`` (B, n): the numerator and denominator of :func:`_weighted_auroc`."""
    order, starts = _tie_groups(scores)
    pos = labels[order] == 1
    w = weights[:, order]
    pw = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)  # (B, U)
    nw = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    below = np.cumsum(nw, axis=1) - nw
    num = (pw * (below + 0.5 * nw)).sum(axis=1)
    den = pw.sum(axis=1) * nw.sum(axis=1)
    return num, den


def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) multinomial case counts, seeded as :func:`radfm3d.evaluation.metrics.bootstrap_sums`."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)


def auroc_figures(
    labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], *, n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """AUROC per class and their mean, with one joint bootstrap over records (rows).

    labels: (N, K) in {1, 0, -1 unknown}; scores: (N, K). -> {"per_class": {name: Figure dict | {"undefined":
    reason, "n", "positives"}}, "mean": Figure dict (over the defined classes), "defined": [names],
    "undefined": [names]}. A resample in which a class has one label value leaves that class out of that
    resample's mean.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    n = labels.shape[0]
    counts = _resample_counts(n, n_resamples, seed) if n else np.zeros((0, 0))
    per_class: dict[str, Any] = {}
    points, boots, defined, undefined = [], [], [], []
    for k, name in enumerate(class_names):
        known = labels[:, k] >= 0
        y, s = labels[known, k], scores[known, k]
        n_pos = int((y == 1).sum())
        if n_pos == 0 or n_pos == y.size:
            per_class[name] = {"undefined": f"labels take one value ({n_pos} of {y.size} present)",
                               "n": int(y.size), "positives": n_pos}
            undefined.append(name)
            continue
        point = float(_weighted_auroc(s, y, np.ones((1, y.size)))[0])
        boot = _weighted_auroc(s, y, counts[:, known])
        per_class[name] = {**Figure(point, *_percentiles(boot), int(y.size)).to_dict(), "positives": n_pos}
        points.append(point)
        boots.append(boot)
        defined.append(name)
    return _class_summary(per_class, points, boots, defined, undefined, n)


def _class_summary(per_class: dict[str, Any], points: list[float], boots: list[np.ndarray], defined: list[str],
                   undefined: list[str], n: int) -> dict[str, Any]:
    """Per-class figures plus their mean over the defined classes (interval from the per-resample means)."""
    if defined:
        with np.errstate(invalid="ignore"), _quiet():
            mean_boot = np.nanmean(np.stack(boots, axis=1), axis=1)
        mean = Figure(float(np.mean(points)), *_percentiles(mean_boot), n).to_dict()
    else:
        mean = Figure(float("nan"), float("nan"), float("nan"), n).to_dict()
    return {"per_class": per_class, "mean": mean, "defined": defined, "undefined": undefined}


def stratified_auroc_figures(
    labels: np.ndarray, scores: np.ndarray, strata: Sequence[str], class_names: Sequence[str], *,
    n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """AUROC per class counted only inside strata, and their mean, with the joint bootstrap of :func:`auroc_figures`
    (the same resampled records).

    labels: (N, K) in {1, 0, -1 unknown}; scores: (N, K); strata: (N,) keys. Per class: the correctly ordered
    positive-negative pairs (ties one half) summed over strata, over all positive-negative pairs whose two records
    share a stratum. With one stratum this is the plain AUROC. -> the shape of :func:`auroc_figures`, each defined
    class with ``"strata"`` (the strata holding both labels; ``n`` counts their records); undefined with the reason
    when no stratum holds both label values.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    keys = np.asarray([str(s) for s in strata])
    n = labels.shape[0]
    if keys.shape[0] != n:
        raise ValueError(f"strata has {keys.shape[0]} rows, labels {n}")
    counts = _resample_counts(n, n_resamples, seed) if n else np.zeros((0, 0))
    per_class: dict[str, Any] = {}
    points, boots, defined, undefined = [], [], [], []
    for k, name in enumerate(class_names):
        known = labels[:, k] >= 0
        num = np.zeros(1)
        den = np.zeros(1)
        bnum = np.zeros(counts.shape[0])
        bden = np.zeros(counts.shape[0])
        used, n_used, n_pos = [], 0, 0
        for key in dict.fromkeys(keys[known].tolist()):
            rows = known & (keys == key)
            y, s = labels[rows, k], scores[rows, k]
            p = int((y == 1).sum())
            if p == 0 or p == y.size:
                continue
            a, b = _weighted_pairs(s, y, np.ones((1, y.size)))
            num, den = num + a, den + b
            a, b = _weighted_pairs(s, y, counts[:, rows])
            bnum, bden = bnum + a, bden + b
            used.append(key)
            n_used += int(y.size)
            n_pos += p
        if not used:
            y = labels[known, k]
            per_class[name] = {"undefined": f"no stratum holds both label values ({int((y == 1).sum())} of {y.size} "
                                            f"present, {len(set(keys[known].tolist()))} strata)",
                               "n": int(y.size), "positives": int((y == 1).sum())}
            undefined.append(name)
            continue
        point = float(num[0] / den[0])
        boot = _pair_ratio(bnum, bden)
        per_class[name] = {**Figure(point, *_percentiles(boot), n_used).to_dict(), "positives": n_pos,
                           "strata": used}
        points.append(point)
        boots.append(boot)
        defined.append(name)
    return _class_summary(per_class, points, boots, defined, undefined, n)


class _quiet:
    """Silence numpy's "mean of empty slice" RuntimeWarning inside a block."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of one class's known labels (scikit-learn's ``roc_curve``)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


# -------------------------------------------------------------------------------------------- retrieval
_SPACE = re.compile(r"\s+")


def normalize_report(text: str) -> str:
    """Report text for grouping: lower case, whitespace collapsed, stripped (the contrastive loss's grouping)."""
    return _SPACE.sub(" ", str(text).lower()).strip()


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _chance_any_of_group(n: int, m: int, k: int) -> float:
    """P(a random ranking of n items puts at least one of m marked items in the top k) = 1 - C(n-m,k)/C(n,k)."""
    k = min(k, n)
    if m <= 0:
        return 0.0
    return 1.0 - math.comb(n - m, k) / math.comb(n, k) if n - m >= k else 1.0


def retrieval_figures(
    image_embeds: np.ndarray, text_embeds: np.ndarray, report_texts: Sequence[str], *, ks: Sequence[int] = KS,
    n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, prior_texts: Sequence[str] | None = None,
    strata: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Image->report and report->image recall@k by cosine similarity, identical reports grouped.

    image_embeds, text_embeds: (N, P); report_texts: (N,). Image->report: each of the N images ranks the G unique
    reports (a group's text embedding is the mean of its members' unit embeddings), hit when its own report is in
    the top k; chance k/G. Report->image: each of the G unique reports ranks the N images, hit when any image of
    that report is in the top k; chance 1 - C(N-m, k)/C(N, k) for a report with m images, averaged. The blind
    image->report baseline ranks the reports by their frequency in ``prior_texts`` (training reports; default the
    evaluated ones) and ignores the image.
    With ``strata`` (N,), e.g. each record's body region, also ``"within_stratum"``
    (:func:`stratified_retrieval_figures`): the same recalls when only candidates of the query's stratum compete.
    -> {"image_to_report": {"R@k": Figure dict, "chance@k": float, "blind@k": Figure dict}, "report_to_image":
    {...}, "n_images", "n_unique_reports"[, "within_stratum"]}.
    """
    norm = [normalize_report(t) for t in report_texts]
    uniq = list(dict.fromkeys(norm))
    gid = _group_index(norm, uniq)
    n, g = len(norm), len(uniq)
    img = _unit(image_embeds)
    txt = _unit(text_embeds)
    onehot = np.zeros((g, n))
    onehot[gid, np.arange(n)] = 1.0
    group_txt = _unit(onehot @ txt)  # (G, P)
    sim = img @ group_txt.T  # (N, G)
    # rank of the true group: the number of groups scoring strictly higher (ties resolved in the query's favour
    # would flatter constant embeddings, so ties count against it: rank = #(>=) - 1)
    true = sim[np.arange(n), gid]
    rank_i2r = (sim >= true[:, None]).sum(axis=1) - 1
    sim_r2i = sim.T  # (G, N)
    best_true = np.where(onehot > 0, sim_r2i, -np.inf).max(axis=1)  # best-scoring image of the report's group
    rank_r2i = (np.where(onehot > 0, -np.inf, sim_r2i) >= best_true[:, None]).sum(axis=1)
    sizes = onehot.sum(axis=1).astype(int)
    prior = Counter(normalize_report(t) for t in (prior_texts if prior_texts is not None else report_texts))
    # the G candidate reports, most frequent (in the prior texts) first, ties by first appearance
    blind_rank_of = {t: i for i, t in enumerate(sorted(uniq, key=lambda t: -prior.get(t, 0)))}
    blind_rank = np.array([blind_rank_of[t] for t in norm])
    boot = {"n_resamples": n_resamples, "seed": seed}
    i2r: dict[str, Any] = {}
    r2i: dict[str, Any] = {}
    for k in ks:
        i2r[f"R@{k}"] = bootstrap_figure((rank_i2r < k).astype(np.float64), **boot).to_dict()
        i2r[f"chance@{k}"] = min(k, g) / g
        i2r[f"blind@{k}"] = bootstrap_figure((blind_rank < k).astype(np.float64), **boot).to_dict()
        r2i[f"R@{k}"] = bootstrap_figure((rank_r2i < k).astype(np.float64), **boot).to_dict()
        r2i[f"chance@{k}"] = float(np.mean([_chance_any_of_group(n, int(m), k) for m in sizes]))
    out = {"image_to_report": i2r, "report_to_image": r2i, "n_images": n, "n_unique_reports": g}
    if strata is not None:
        out["within_stratum"] = stratified_retrieval_figures(sim, gid, strata, ks=ks, **boot)
    return out


def stratified_retrieval_figures(sim: np.ndarray, gid: np.ndarray, strata: Sequence[str], *, ks: Sequence[int] = KS,
                                 n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Recall@k when only candidates of the query's stratum compete: what is left once telling strata apart (e.g.
    body regions) no longer helps; a model that only recognises the stratum is at chance here.

    sim: (N, G) image x unique-report similarities; gid: (N,) each image's report group; strata: (N,) each image's
    stratum (a report's strata are those of its images). Image->report: each image ranks the report groups that
    have an image in its stratum; chance k/G_s. Report->image: each (report group, stratum) pair ranks the images of
    that stratum, hit when one of the group's images there is in the top k; chance 1 - C(N_s-m, k)/C(N_s, k).
    Ties count against the query, as in :func:`retrieval_figures`.
    -> {"image_to_report": {"R@k", "chance@k"}, "report_to_image": {"R@k", "chance@k"}, "n_strata"}.
    """
    labels = np.asarray([str(x) for x in strata])
    n, g = sim.shape
    if labels.shape != (n,):
        raise ValueError(f"strata: expected {n} values, got {labels.shape[0]}")
    names, stratum = np.unique(labels, return_inverse=True)
    member = np.zeros((g, len(names)), dtype=bool)  # (G, S): the report group has an image in the stratum
    member[gid, stratum] = True
    candidate = member[:, stratum].T  # (N, G)
    true = sim[np.arange(n), gid]
    rank_i2r = ((sim >= true[:, None]) & candidate).sum(axis=1) - 1
    n_candidates = candidate.sum(axis=1)
    pair_hits: dict[int, list[float]] = {k: [] for k in ks}
    pair_chance: dict[int, list[float]] = {k: [] for k in ks}
    for s in range(len(names)):
        in_s = np.flatnonzero(stratum == s)
        for group in np.unique(gid[in_s]):
            own = gid[in_s] == group
            scores = sim[in_s, group]
            best = scores[own].max()
            rank = int((scores[~own] >= best).sum())
            for k in ks:
                pair_hits[k].append(float(rank < k))
                pair_chance[k].append(_chance_any_of_group(len(in_s), int(own.sum()), k))
    boot = {"n_resamples": n_resamples, "seed": seed}
    i2r: dict[str, Any] = {}
    r2i: dict[str, Any] = {}
    for k in ks:
        i2r[f"R@{k}"] = bootstrap_figure((rank_i2r < k).astype(np.float64), **boot).to_dict()
        i2r[f"chance@{k}"] = float(np.mean(np.minimum(k, n_candidates) / n_candidates))
        r2i[f"R@{k}"] = bootstrap_figure(np.asarray(pair_hits[k]), **boot).to_dict()
        r2i[f"chance@{k}"] = float(np.mean(pair_chance[k]))
    return {"image_to_report": i2r, "report_to_image": r2i, "n_strata": len(names)}


def _group_index(norm: Sequence[str], uniq: Sequence[str]) -> np.ndarray:
    where = {t: i for i, t in enumerate(uniq)}
    return np.array([where[t] for t in norm])


def localisation_figure(region_embeds: np.ndarray, text_embeds: np.ndarray, series: Sequence[str],
                        regions: Sequence[str], *, n_resamples: int = N_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Whether each sentence's own region scores highest among the distinct regions of its series.

    region_embeds, text_embeds: (R, P) rows (a region and a sentence about it); series, regions: (R,) keys (rows with
    equal keys are one region, embedded by its first row). Rows whose series has one distinct region are left out
    (nothing to choose); ties count against; the interval resamples series. -> {"accuracy": Figure dict (n =
    sentences scored), "chance": mean 1 / number of distinct regions, "n_series"}.
    """
    img, txt = _unit(region_embeds), _unit(text_embeds)
    by_series: dict[str, dict[str, int]] = {}
    for i, (s, r) in enumerate(zip(series, regions)):
        by_series.setdefault(str(s), {}).setdefault(str(r), i)
    per_series: dict[str, list[float]] = {}
    chance = []
    for i, (s, r) in enumerate(zip(series, regions)):
        candidates = by_series[str(s)]
        if len(candidates) < 2:
            continue
        keys = list(candidates)
        sims = img[[candidates[k] for k in keys]] @ txt[i]
        own = sims[keys.index(str(r))]
        per_series.setdefault(str(s), []).append(float((sims >= own).sum() == 1))
        chance.append(1.0 / len(keys))
    # the sentences of one series are not independent: resample series (hits, sentences per series)
    stats = np.array([[sum(h), len(h)] for h in per_series.values()], dtype=np.float64).reshape(-1, 2)
    fig = bootstrap_figure(stats, statistic=lambda sums: sums[..., 0] / sums[..., 1], n_resamples=n_resamples,
                           seed=seed)
    fig.n = int(stats[:, 1].sum())
    return {"accuracy": fig.to_dict(), "chance": float(np.mean(chance)) if chance else None,
            "n_series": len(per_series)}


def structure_figures(e: Embeddings, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED
                      ) -> dict[str, Any] | None:
    """Structure-level retrieval (:func:`retrieval_figures` with regions as images and sentences as reports) and
    :func:`localisation_figure`; None without structure rows."""
    if e.structure_series is None or e.structure_series.shape[0] == 0:
        return None
    boot = {"n_resamples": n_resamples, "seed": seed}
    ret = retrieval_figures(e.structure_embeds, e.structure_text_embeds, e.structure_texts.tolist(), **boot)
    return {"n_rows": int(e.structure_series.shape[0]), "retrieval": ret,
            "localisation": localisation_figure(e.structure_embeds, e.structure_text_embeds,
                                                e.structure_series.tolist(), e.structure_regions.tolist(), **boot)}


# ----------------------------------------------------------------------------------------- dimensionality
def effective_dimensionality(embeds: np.ndarray, variance: float = 0.9) -> dict[str, Any]:
    """Participation ratio ``(sum l)^2 / sum l^2`` of the covariance eigenvalues ``l`` of the L2-normalised
    embeddings (N, P), the number of components holding ``variance`` of the variance, and the spectrum
    (descending). Isotropic embeddings give P, embeddings on one line give 1."""
    x = _unit(embeds)
    x = x - x.mean(axis=0, keepdims=True)
    n, p = x.shape
    cov = x.T @ x / max(n - 1, 1)
    eig = np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None)
    eig[eig < 1e-12 * max(float(eig[0]) if eig.size else 0.0, 1e-300)] = 0.0  # round-off beyond the rank
    total = float(eig.sum())
    if total <= 0:
        return {"participation_ratio": 0.0, f"components_{int(variance * 100)}": 0, "dim": p, "n": n,
                "eigenvalues": eig.tolist()}
    pr = total ** 2 / float((eig ** 2).sum())
    n_var = int(np.searchsorted(np.cumsum(eig) / total, variance - 1e-12) + 1)
    return {"participation_ratio": float(pr), f"components_{int(variance * 100)}": n_var, "dim": p, "n": n,
            "eigenvalues": eig.tolist()}


# ------------------------------------------------------------------------------------------- linear probe
def linear_probe(
    train_embeds: np.ndarray, train_labels: np.ndarray, test_embeds: np.ndarray, test_labels: np.ndarray,
    class_names: Sequence[str], *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, C: float = 1.0,
    test_strata: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per class, scikit-learn ``LogisticRegression`` (L2, ``C``, balanced class weights) on the L2-normalised
    training embeddings (records with a known label), probability of "present" on the test embeddings, and
    :func:`auroc_figures` of those scores (and with ``test_strata`` (N_test,), ``"stratified"``:
    :func:`stratified_auroc_figures` of them). A class whose training labels take one value is not fitted
    (undefined)."""
    from sklearn.linear_model import LogisticRegression

    xtr, xte = _unit(train_embeds), _unit(test_embeds)
    scores = np.zeros((xte.shape[0], len(class_names)))
    labels = np.asarray(test_labels).copy()
    not_fitted = {}
    for k, name in enumerate(class_names):
        known = train_labels[:, k] >= 0
        y = train_labels[known, k]
        if y.size == 0 or y.min() == y.max():
            not_fitted[name] = f"training labels take one value ({int((y == 1).sum())} of {y.size} present)"
            labels[:, k] = -1
            continue
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000)
        clf.fit(xtr[known], y)
        scores[:, k] = clf.predict_proba(xte)[:, 1]
    out = auroc_figures(labels, scores, class_names, n_resamples=n_resamples, seed=seed)
    if test_strata is not None:
        out["stratified"] = stratified_auroc_figures(labels, scores, test_strata, class_names,
                                                     n_resamples=n_resamples, seed=seed)
    for name, why in not_fitted.items():
        for block in (out, out.get("stratified") or {"per_class": {}}):
            block["per_class"][name] = {"undefined": why, "n": int((np.asarray(test_labels)[
                :, list(class_names).index(name)] >= 0).sum()), "positives": None}
    out["n_train"] = int(xtr.shape[0])
    out["scores"] = scores
    return out


# ---------------------------------------------------------------------------------------------- scoring
def score_embeddings(
    test: Embeddings, *, train: Embeddings | None = None, n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED, name: str = "model",
) -> dict[str, Any]:
    """Every figure of one model on the evaluated records ``test`` (labels already resolved into ``test.labels``);
    ``train`` (with labels) for the linear probe and the blind retrieval baseline.

    -> {"name", "n_records", "zero_shot", "retrieval", "dimensionality": {"image", "text"}, "probe", "notes"}; a
    part that cannot be computed is None with a note saying why. With ``test.strata``, "zero_shot" and "probe" also
    hold "stratified" (:func:`stratified_auroc_figures`) and "n_strata".
    """
    boot = {"n_resamples": n_resamples, "seed": seed}
    notes: list[str] = []
    res: dict[str, Any] = {"name": name, "n_records": len(test), "source": test.source}
    classes = test.class_names.tolist() if test.class_names is not None else []
    res["classes"] = classes
    if test.zero_shot_scores is not None and test.labels is not None:
        res["zero_shot"] = auroc_figures(test.labels, test.zero_shot_scores, classes, **boot)
        res["zero_shot"]["blind"] = 0.5
        if test.report_zero_shot_scores is not None:
            # the same prompts scored against each record's own report text: what the prompts reach at best
            res["zero_shot"]["report_text"] = auroc_figures(test.labels, test.report_zero_shot_scores, classes,
                                                            **boot)
        if test.strata is not None:
            res["zero_shot"]["stratified"] = stratified_auroc_figures(test.labels, test.zero_shot_scores,
                                                                      test.strata.tolist(), classes, **boot)
        if test.structure_zero_shot_scores is not None:
            # organ-level zero-shot: only records with a region of the class's structure are scored
            scores = test.structure_zero_shot_scores
            scored_labels = np.where(np.isnan(scores), -1, test.labels).astype(np.int8)
            res["zero_shot"]["structure"] = auroc_figures(scored_labels, np.nan_to_num(scores, nan=0.0), classes,
                                                          **boot)
    else:
        res["zero_shot"] = None
        notes.append("zero-shot: the embeddings hold no zero_shot_scores" if test.zero_shot_scores is None
                     else "zero-shot: no labels for the classes (give --label-schema or records with 'labels')")
    if test.strata is not None:
        res["n_strata"] = len(set(test.strata.tolist()))
    if test.text_embeds is not None:
        prior = train.report_texts.tolist() if train is not None else None
        res["retrieval"] = retrieval_figures(test.image_embeds, test.text_embeds, test.report_texts.tolist(),
                                             prior_texts=prior, strata=test.strata.tolist()
                                             if test.strata is not None else None, **boot)
        res["retrieval"]["image_to_report"]["blind_source"] = "train" if prior is not None else "evaluated"
    else:
        res["retrieval"] = None
        notes.append("retrieval: the embeddings hold no text_embeds")
    res["structure"] = structure_figures(test, **boot)
    res["dimensionality"] = {"image": effective_dimensionality(test.image_embeds)}
    if test.text_embeds is not None:
        res["dimensionality"]["text"] = effective_dimensionality(test.text_embeds)
    if train is None:
        res["probe"] = None
        notes.append("linear probe: no training records (give --train-manifest)")
    elif test.labels is None or train.labels is None:
        res["probe"] = None
        notes.append("linear probe: no labels")
    else:
        probe = linear_probe(train.image_embeds, train.labels, test.image_embeds, test.labels, classes,
                             test_strata=test.strata.tolist() if test.strata is not None else None, **boot)
        probe.pop("scores")
        probe["blind"] = 0.5
        res["probe"] = probe
    res["notes"] = notes
    return res


def _fig(f: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not f or f.get("value") is None:
        return "—"
    if f.get("low") is None:
        return f"{f['value']:.{digits}f}"
    return f"{f['value']:.{digits}f} [{f['low']:.{digits}f}, {f['high']:.{digits}f}]"


def comparison_table(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown table, one row per model: zero-shot and probe mean AUROC (each also within strata), R@1/5/10 both
    ways (R@5 also within strata), participation ratios (image / text) -- the level ablation is one model per
    row."""
    head = ("| model | n | zero-shot mean AUROC | zero-shot within stratum | zero-shot on structure regions | "
            "prompts on report text | probe mean AUROC | probe within stratum | image→report R@1 / R@5 / R@10 | "
            "report→image R@1 / R@5 / R@10 | R@5 within stratum (image→report / report→image) | "
            "structure: sentence→region R@5 / localisation | PR image / text |")
    lines = [head, "|" + "---|" * 13]
    for name, m in models.items():
        zs = _fig((m.get("zero_shot") or {}).get("mean"))
        zs_st = _fig(((m.get("zero_shot") or {}).get("stratified") or {}).get("mean"))
        ceiling = _fig(((m.get("zero_shot") or {}).get("report_text") or {}).get("mean"))
        zs_structure = _fig(((m.get("zero_shot") or {}).get("structure") or {}).get("mean"))
        pr = _fig((m.get("probe") or {}).get("mean"))
        pr_st = _fig(((m.get("probe") or {}).get("stratified") or {}).get("mean"))
        ret = m.get("retrieval")
        cells = []
        for d in ("image_to_report", "report_to_image"):
            cells.append(" / ".join(f"{ret[d][f'R@{k}']['value']:.3f}" for k in KS) if ret else "—")
        within = (ret or {}).get("within_stratum")
        cells.append(" / ".join(f"{within[d]['R@5']['value']:.3f}" for d in ("image_to_report", "report_to_image"))
                     if within else "—")
        dims = m["dimensionality"]
        pr_txt = f"{dims['image']['participation_ratio']:.1f} / " + (
            f"{dims['text']['participation_ratio']:.1f}" if "text" in dims else "—")
        st = m.get("structure")
        st_txt = (f"{st['retrieval']['report_to_image']['R@5']['value']:.3f} / "
                  + (f"{st['localisation']['accuracy']['value']:.3f}"
                     if st["localisation"]["accuracy"]["value"] is not None else "—")) if st else "—"
        lines.append(f"| {name} | {m['n_records']} | {zs} | {zs_st} | {zs_structure} | {ceiling} | {pr} | {pr_st} | "
                     f"{cells[0]} | {cells[1]} | {cells[2]} | {st_txt} | {pr_txt} |")
    first = next(iter(models.values()), None)
    if first and first.get("retrieval"):
        ret = first["retrieval"]
        st = first.get("structure")
        st_chance = (f"{st['retrieval']['report_to_image']['chance@5']:.3f} / "
                     + (f"{st['localisation']['chance']:.3f}" if st["localisation"]["chance"] is not None
                        else "—")) if st else ""
        lines.append("| chance / blind | | 0.5 | 0.5 | 0.5 | 0.5 | 0.5 | 0.5 | " + " / ".join(
            f"{ret['image_to_report'][f'chance@{k}']:.3f}" for k in KS) + " (blind " + " / ".join(
            f"{ret['image_to_report'][f'blind@{k}']['value']:.3f}" for k in KS) + ") | " + " / ".join(
            f"{ret['report_to_image'][f'chance@{k}']:.3f}" for k in KS) + " | " + (" / ".join(
            f"{ret['within_stratum'][d]['chance@5']:.3f}" for d in ("image_to_report", "report_to_image"))
            if ret.get("within_stratum") else "") + f" | {st_chance} | |")
    return lines


def markdown_report(results: Mapping[str, Any]) -> str:
    """report.md: the comparison table, then per model the zero-shot and probe AUROC per class, retrieval against
    chance and the blind baseline, and the effective dimensionality."""
    meta = results["meta"]
    models = results["models"]
    lines = ["# Embedding evaluation", "",
             f"Manifest `{meta.get('manifest')}`: {meta.get('n_records')} report records "
             f"({meta.get('n_unique_reports', '?')} unique reports); intervals: percentile bootstrap 95% over "
             f"records ({meta['bootstrap']['n_resamples']} resamples, seed {meta['bootstrap']['seed']}). "
             f"Classes from {meta.get('label_source')}. Retrieval groups identical reports (lower case, collapsed "
             "whitespace). PR = participation ratio of the covariance spectrum of the L2-normalised embeddings.",
             "", "## Comparison (one row per model; a level ablation is one model per row)", ""]
    lines += comparison_table(models)
    failures = results.get("failures") or []
    if failures:
        lines += ["", f"## Records not embedded ({len(failures)}, not scored)", "", "| model | id | problem |",
                  "|---|---|---|"]
        lines += [f"| {f.get('model', '')} | {f['id']} | {str(f['problem']).replace('|', '/')} |" for f in failures]
    strat_key = meta.get("stratify_by") or "stratum"
    for name, m in models.items():
        lines += ["", f"## {name}", "", f"Embeddings: `{m.get('source')}`; {m['n_records']} records.", ""]
        for part, title in (("zero_shot", "Zero-shot AUROC"), ("probe", "Linear probe AUROC")):
            block = m.get(part)
            if not block:
                continue
            extra = f" (trained on {block['n_train']} records)" if part == "probe" else ""
            ceiling = (block.get("report_text") or {}).get("per_class", {})
            strat = block.get("stratified")
            regional = block.get("structure")
            head = ("| class | AUROC | 95% CI | n | positives |" + (" within stratum (n) |" if strat else "")
                    + (" on structure regions (n) |" if regional else "")
                    + (" prompts on report text |" if ceiling else ""))
            lines += [f"### {title}{extra}", "", head,
                      "|---|---|---|---|---|" + ("---|" if strat else "") + ("---|" if regional else "")
                      + ("---|" if ceiling else "")]
            for cls, f in block["per_class"].items():
                tail = ""
                for extra_block in (strat, regional):
                    if extra_block:
                        sf = extra_block["per_class"].get(cls, {})
                        tail += (f" {_fig(sf)} ({sf['n']}) |" if sf.get("value") is not None else
                                 f" undefined: {sf.get('undefined', '—')} |")
                tail += f" {_fig(ceiling.get(cls), 3) if ceiling.get(cls, {}).get('value') is not None else '—'} |" \
                    if ceiling else ""
                if "undefined" in f:
                    pos = "—" if f["positives"] is None else f["positives"]
                    lines.append(f"| {cls} | undefined | {f['undefined']} | {f['n']} | {pos} |{tail}")
                else:
                    lines.append(f"| {cls} | {f['value']:.3f} | [{f['low']:.3f}, {f['high']:.3f}] | {f['n']} | "
                                 f"{f['positives']} |{tail}")
            mean_tail = (f" {_fig(strat['mean'])} |" if strat else "") + (
                f" {_fig(regional['mean'])} |" if regional else "") + (
                f" {_fig(block['report_text']['mean'])} |" if ceiling else "")
            lines.append(f"| **mean** ({len(block['defined'])} defined) | {_fig(block['mean'])} | | "
                         f"{block['mean']['n']} | |{mean_tail}")
            lines += ["", "Blind baseline: a constant score, AUROC 0.5."
                      + (f" Within stratum: only positive-negative pairs of records with the same {strat_key} "
                         f"({m.get('n_strata')} strata) are compared, which controls for {strat_key} recognition: a "
                         f"score that only tells one {strat_key} from another (e.g. because each finding occurs in "
                         "one body region) gets 0.5 there however high its plain AUROC; chance is 0.5."
                         if strat else "")
                      + (" On structure regions: the prompts scored on the embedding of the class's structure "
                         "region (its box or mask, from the manifest's `report_structures`) instead of the whole "
                         "scan's, over the records that have that structure; an organ-level zero-shot."
                         if regional else "")
                      + (" Prompts on report text: the same prompts scored against each record's own report "
                         "embedding instead of its image's (the text side's ceiling)." if ceiling else ""), ""]
        ret = m.get("retrieval")
        if ret:
            lines += [f"### Retrieval ({ret['n_images']} images, {ret['n_unique_reports']} unique reports)", "",
                      "| direction | k | recall | 95% CI | chance | blind (most frequent reports) |",
                      "|---|---|---|---|---|---|"]
            for d, label in (("image_to_report", "image→report"), ("report_to_image", "report→image")):
                for k in KS:
                    f = ret[d][f"R@{k}"]
                    blind = _fig(ret[d].get(f"blind@{k}")) if d == "image_to_report" else "= chance"
                    lines.append(f"| {label} | {k} | {f['value']:.3f} | [{f['low']:.3f}, {f['high']:.3f}] | "
                                 f"{ret[d][f'chance@{k}']:.3f} | {blind} |")
            within = ret.get("within_stratum")
            if within:
                for d, label in (("image_to_report", "image→report"), ("report_to_image", "report→image")):
                    for k in KS:
                        f = within[d][f"R@{k}"]
                        lines.append(f"| {label}, within stratum | {k} | {f['value']:.3f} | [{f['low']:.3f}, "
                                     f"{f['high']:.3f}] | {within[d][f'chance@{k}']:.3f} | |")
            lines.append("")
            if within:
                lines += [f"Within stratum: only candidates of the query's stratum ({within['n_strata']} strata) "
                          "compete, so recognising the stratum (e.g. the body region) no longer helps; report→image "
                          "counts each (report, stratum) pair once.", ""]
        st = m.get("structure")
        if st:
            sr, loc = st["retrieval"], st["localisation"]
            lines += [f"### Structure level ({st['n_rows']} sentence-region rows, {sr['n_unique_reports']} unique "
                      "sentences)", "", "| figure | value | 95% CI | chance |", "|---|---|---|---|"]
            for d, label in (("image_to_report", "region→sentence"), ("report_to_image", "sentence→region")):
                for k in KS:
                    f = sr[d][f"R@{k}"]
                    lines.append(f"| {label} R@{k} | {f['value']:.3f} | [{f['low']:.3f}, {f['high']:.3f}] | "
                                 f"{sr[d][f'chance@{k}']:.3f} |")
            a = loc["accuracy"]
            if a["value"] is not None:
                lines.append(f"| localisation (own region first among its series' regions; {loc['n_series']} "
                             f"series) | {a['value']:.3f} | [{a['low']:.3f}, {a['high']:.3f}] | {loc['chance']:.3f} |")
            lines.append("")
        lines += ["### Effective dimensionality", "", "| embeddings | dim | participation ratio | components for 90% "
                  "variance |", "|---|---|---|---|"]
        for which, d in m["dimensionality"].items():
            lines.append(f"| {which} | {d['dim']} | {d['participation_ratio']:.2f} | {d['components_90']} |")
        first_dims = next(iter(m["dimensionality"].values()))
        if first_dims["n"] - 1 < first_dims["dim"]:
            lines.append(f"\n{first_dims['n']} records span at most {first_dims['n'] - 1} dimensions: both figures "
                         "are bounded by that, not only by the model.")
        for note in m.get("notes", []):
            lines.append(f"- note: {note}")
    plots = results.get("plots") or {}
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def write_plots(results: Mapping[str, Any], curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                out_dir: str | os.PathLike) -> dict[str, Path]:
    """recall_at_k.png (R@k per model and direction, 95% whiskers, chance ticks), spectrum.png (image-embedding
    eigenvalue spectra, log scale) and roc_<model>.png (zero-shot ROC per class) -> name -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths: dict[str, Path] = {}
    models = results["models"]
    with_ret = {n: m for n, m in models.items() if m.get("retrieval")}
    if with_ret:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        width = 0.8 / max(len(with_ret), 1)
        x = np.arange(len(KS))
        for ax, (d, label) in zip(axes[0], (("image_to_report", "image → report"),
                                            ("report_to_image", "report → image (unique reports)"))):
            for i, (name, m) in enumerate(with_ret.items()):
                figs = [m["retrieval"][d][f"R@{k}"] for k in KS]
                vals = np.array([f["value"] for f in figs])
                err = np.array([[v - (f["low"] if f["low"] is not None else v) for v, f in zip(vals, figs)],
                                [(f["high"] if f["high"] is not None else v) - v for v, f in zip(vals, figs)]])
                ax.bar(x + (i - (len(with_ret) - 1) / 2) * width, vals, width, yerr=np.clip(err, 0, None),
                       capsize=2, label=name)
            chance = next(iter(with_ret.values()))["retrieval"][d]
            for j, k in enumerate(KS):
                ax.hlines(chance[f"chance@{k}"], j - 0.45, j + 0.45, colors="tab:red", linestyles="--",
                          label="chance" if j == 0 else None)
            ax.set_xticks(x, [f"R@{k}" for k in KS])
            ax.set_ylim(0, 1.05)
            ax.set_title(label, fontsize=10)
            ax.legend(fontsize=7)
        fig.tight_layout()
        try:
            paths["recall_at_k"] = atomic_savefig(fig, out / "recall_at_k.png", dpi=100)
        finally:
            plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        eig = np.asarray(m["dimensionality"]["image"]["eigenvalues"])
        eig = eig[eig > 0]
        if eig.size:
            ax.semilogy(np.arange(1, eig.size + 1), eig / eig.sum(), marker=".", label=
                        f"{name} (PR {m['dimensionality']['image']['participation_ratio']:.1f})")
    ax.set_xlabel("component")
    ax.set_ylabel("fraction of variance")
    ax.set_title("image embedding eigenvalue spectrum", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        paths["spectrum"] = atomic_savefig(fig, out / "spectrum.png", dpi=100)
    finally:
        plt.close(fig)
    for name, per_class in curves.items():
        if not per_class:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.set_prop_cycle(color=list(plt.get_cmap("tab20").colors))
        auc = (models[name].get("zero_shot") or {}).get("per_class", {})
        for cls, (fpr, tpr) in per_class.items():
            ax.plot(fpr, tpr, lw=1, label=f"{cls} ({auc.get(cls, {}).get('value', float('nan')):.2f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{name}: zero-shot ROC per class (AUROC)", fontsize=10)
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        try:
            paths[f"roc_{name}"] = atomic_savefig(fig, out / f"roc_{_safe(name)}.png", dpi=100)
        finally:
            plt.close(fig)
    return paths


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def zero_shot_curves(e: Embeddings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ROC points per class with defined AUROC (both label values among the known labels)."""
    if e.zero_shot_scores is None or e.labels is None or e.class_names is None:
        return {}
    out = {}
    for k, cls in enumerate(e.class_names.tolist()):
        known = e.labels[:, k] >= 0
        y = e.labels[known, k]
        if y.size and 0 < y.sum() < y.size:
            out[cls] = roc_curve_points(y, e.zero_shot_scores[known, k])
    return out


# ---------------------------------------------------------------------------------------------- outputs
def evaluate_models(
    models: Mapping[str, tuple[Embeddings, Embeddings | None]], *, n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED, meta: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """Score several models (name -> (evaluated records, training records or None), labels resolved) with the same
    code. -> (results {"meta", "models": {name: score_embeddings(...)}, "summary": [table lines]}, ROC curves)."""
    out: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for name, (test, train) in models.items():
        out[name] = score_embeddings(test, train=train, n_resamples=n_resamples, seed=seed, name=name)
        curves[name] = zero_shot_curves(test)
    first = next(iter(models.values()))[0] if models else None
    info = {"bootstrap": {"n_resamples": n_resamples, "seed": seed, "interval": "percentile 95%"},
            "n_records": len(first) if first is not None else 0,
            "n_unique_reports": len({normalize_report(t) for t in first.report_texts.tolist()}) if first else 0,
            **dict(meta or {})}
    results = {"meta": info, "models": out}
    results["summary"] = comparison_table(out)
    return results, curves


def write_results(results: dict[str, Any], curves: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, report.md and the plots (:func:`write_plots`) in ``out_dir`` (atomically) -> name -> path."""
    from radfm3d.utils import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        plots = write_plots(results, curves, out)
    except Exception as err:  # drawing is a courtesy; the figures are written whatever happens to matplotlib
        plots = {}
        results.setdefault("meta", {})["plot_error"] = f"{type(err).__name__}: {err}"
    results["plots"] = {k: p.name for k, p in plots.items()}
    paths = {"json": atomic_write_json(out / "results.json", results),
             "markdown": atomic_write_text(out / "report.md", markdown_report(results))}
    return {**paths, **plots}
