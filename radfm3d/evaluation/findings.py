# Copyright (c) radfm3d contributors. Apache-2.0.
"""Negation-aware finding extraction for the RadPhantom vocabulary, and finding-level P/R/F1.

`extract_findings(text)` -> set of positive `(type, organ, side)` triples, e.g.
"Hemorrhage in the left hemisphere; no cyst." -> {("hemorrhage", "brain", "left")}.

Rules (deliberately simple, tested):
- text is split into clauses at `.`, `;`, `!`, `?`, newlines and the words "but"/"however"/"although";
  negation never crosses a clause;
- a pre-negation cue ("no", "without", "without evidence of", "negative for", "free of", "absence of", "not",
  "rules out" ...) negates every finding mentioned after it in its clause ("No hemorrhage or cyst.");
- a post-negation cue ("resolved", "no longer seen", "absent", "excluded", "not seen" ...) negates every
  finding mentioned before it in its clause ("The cyst has resolved.");
- generic words ("lesion", "abnormality") are not findings themselves, so "No focal liver lesion." gives nothing;
- each finding takes the nearest organ mention in its clause (ties go to the organ after it), and the side
  written next to that organ (else next to the finding, else the organ's default side, else "none").

The vocabulary (types, organs, sides with synonyms) is owned here; a label schema (the JSON data of
`radfm3d.findings.schema`, e.g. a findings model's `label_schema.json`) adds its finding types and flags as types and
its structures as organs (the organ part of a structure's `case` key "organ/side", else its name), so the extractor
follows the schema a model was trained with: `load_vocabulary(schema)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np

from radfm3d.evaluation.metrics import Figure, bootstrap_figure

Finding = tuple[str, str, str]  # (type, organ, side)

#: canonical finding type -> surface forms (singular/plural/adjectives; British spellings)
FINDING_TYPES: dict[str, tuple[str, ...]] = {
    "nodule": ("nodule", "nodules", "nodular opacity"),
    "mass": ("mass", "masses", "tumour", "tumor", "tumours", "tumors"),
    "cyst": ("cyst", "cysts", "cystic lesion", "cystic lesions"),
    "hemorrhage": ("hemorrhage", "haemorrhage", "hemorrhages", "haemorrhages", "bleed", "bleeding",
                   "hematoma", "haematoma"),
    "calcification": ("calcification", "calcifications", "calcified focus", "calcified foci", "calcified nodule"),
    "metastasis": ("metastasis", "metastases", "metastatic lesion", "metastatic lesions"),
    "infarct": ("infarct", "infarcts", "infarction"),
    "edema": ("edema", "oedema"),
    "effusion": ("effusion", "effusions"),
}

#: canonical organ -> (surface forms, default side or "none")
ORGANS: dict[str, tuple[tuple[str, ...], str]] = {
    "brain": (("brain", "hemisphere", "hemispheres", "cerebral", "cerebrum", "cerebral hemisphere", "intracranial",
               "parenchyma", "brain parenchyma"), "none"),
    "ventricles": (("ventricle", "ventricles", "ventricular", "lateral ventricle", "lateral ventricles"), "none"),
    "skull": (("skull", "calvarium", "calvaria", "cranium"), "none"),
    "lung": (("lung", "lungs", "pulmonary", "hemithorax"), "none"),
    "heart": (("heart", "cardiac", "pericardium", "pericardial"), "none"),
    "liver": (("liver", "hepatic"), "none"),
    "spleen": (("spleen", "splenic"), "none"),
    "kidney": (("kidney", "kidneys", "renal"), "none"),
    "spine": (("spine", "vertebra", "vertebrae", "vertebral", "spinal"), "none"),
    "pleura": (("pleura", "pleural"), "none"),
}

SIDES: dict[str, tuple[str, ...]] = {
    "left": ("left", "left-sided", "left sided", "sinistral"),
    "right": ("right", "right-sided", "right sided", "dextral"),
    "bilateral": ("bilateral", "both"),
}

PRE_NEGATION = (
    "no", "not", "without", "without evidence of", "no evidence of", "negative for", "free of", "absence of",
    "rules out", "rule out", "there is no", "there are no", "none", "nor", "neither",
)
#: phrases that look like negation but are not ("no change in the nodule" keeps the nodule)
PSEUDO_NEGATION = (
    "no change", "no interval change", "no significant change", "no increase", "no decrease", "not only",
    "no significant interval change",
)
POST_NEGATION = (
    "resolved", "has resolved", "no longer seen", "no longer visible", "no longer", "absent", "excluded",
    "ruled out", "not seen", "not identified", "not present", "not visible", "disappeared", "is gone",
)
_CLAUSE_SPLIT = re.compile(r"[.;!?\n]+|\b(?:but|however|although|though|whereas)\b", re.IGNORECASE)
_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)?")


@dataclass
class Vocabulary:
    """Surface-form lookup tables: phrase (tuple of tokens) -> canonical name."""

    types: dict[tuple[str, ...], str] = field(default_factory=dict)
    organs: dict[tuple[str, ...], str] = field(default_factory=dict)
    default_side: dict[str, str] = field(default_factory=dict)
    sides: dict[tuple[str, ...], str] = field(default_factory=dict)
    pre_neg: set[tuple[str, ...]] = field(default_factory=set)
    post_neg: set[tuple[str, ...]] = field(default_factory=set)
    pseudo_neg: set[tuple[str, ...]] = field(default_factory=set)
    source: str = "radfm3d.evaluation.findings"


def _tok(phrase: str) -> tuple[str, ...]:
    return tuple(_TOKEN.findall(phrase.lower().replace("-", " ")))


def load_vocabulary(schema: Any = None) -> Vocabulary:
    """The extractor's vocabulary; with ``schema`` (label-schema JSON data, or the path of its file) the schema's
    finding types, flags and structures are merged in."""
    import json
    from pathlib import Path

    if schema is not None and not isinstance(schema, dict):
        schema = json.loads(Path(schema).read_text())
    return _vocabulary(json.dumps(schema, sort_keys=True) if schema is not None else None)


@lru_cache(maxsize=8)
def _vocabulary(schema_json: str | None) -> Vocabulary:
    import json

    types = {k: set(v) for k, v in FINDING_TYPES.items()}
    organs = {k: (set(v[0]), v[1]) for k, v in ORGANS.items()}
    source = "radfm3d.evaluation.findings"
    if schema_json is not None:
        schema = json.loads(schema_json)
        for entry in list(schema.get("finding_types") or []) + list(schema.get("flags") or []):
            name = str(entry["name"]).replace("_", " ")
            types.setdefault(name, set()).update({name, str(entry.get("phrase", name)).strip().lower()})
        for entry in schema.get("structures") or []:
            organ = str(entry.get("case", entry["name"])).split("/")[0].replace("_", " ")
            organs.setdefault(organ, (set(), "none"))[0].add(organ)
        source += f" + label schema {schema.get('name', 'custom')!r}"
    vocab = Vocabulary(source=source)
    for canon, forms in types.items():
        for f in forms | {canon}:
            vocab.types[_tok(f)] = canon
    for canon, (forms, side) in organs.items():
        vocab.default_side[canon] = side
        for f in forms | {canon}:
            vocab.organs[_tok(f)] = canon
    for canon, forms in SIDES.items():
        for f in forms:
            vocab.sides[_tok(f)] = canon
    vocab.pre_neg = {_tok(p) for p in PRE_NEGATION}
    vocab.post_neg = {_tok(p) for p in POST_NEGATION}
    vocab.pseudo_neg = {_tok(p) for p in PSEUDO_NEGATION}
    return vocab


def _spans(tokens: Sequence[str], table: dict[tuple[str, ...], Any] | set[tuple[str, ...]]) -> list[tuple[int, int]]:
    """Greedy longest-match spans (start, end) of phrases from `table` in `tokens`."""
    max_len = max((len(k) for k in table), default=0)
    spans, i = [], 0
    while i < len(tokens):
        for n in range(min(max_len, len(tokens) - i), 0, -1):
            if tuple(tokens[i : i + n]) in table:
                spans.append((i, i + n))
                i += n
                break
        else:
            i += 1
    return spans


def _clause_findings(tokens: list[str], vocab: Vocabulary) -> set[Finding]:
    types = _spans(tokens, vocab.types)
    if not types:
        return set()
    organs = _spans(tokens, vocab.organs)
    sides = _spans(tokens, vocab.sides)
    post = _spans(tokens, vocab.post_neg)
    # pre-negation cues: take those not part of a post-negation phrase ("no longer seen")
    post_tokens = {i for s, e in post for i in range(s, e)}
    post_tokens |= {i for s, e in _spans(tokens, vocab.pseudo_neg) for i in range(s, e)}
    pre = [(s, e) for s, e in _spans(tokens, vocab.pre_neg) if s not in post_tokens]
    out: set[Finding] = set()
    for ts, te in types:
        if any(e <= ts for s, e in pre) or any(s >= te for s, e in post):
            continue
        ftype = vocab.types[tuple(tokens[ts:te])]
        organ, side = "none", None
        if organs:
            # nearest organ; ties (same distance before/after) go to the organ after the finding
            def dist(span: tuple[int, int]) -> tuple[int, int]:
                s, e = span
                return (s - te if s >= te else ts - e + 1, 0 if s >= te else 1)

            os_, oe = min(organs, key=dist)
            organ = vocab.organs[tuple(tokens[os_:oe])]
            side = _adjacent_side(sides, tokens, os_, oe, vocab)
        if side is None:
            side = _adjacent_side(sides, tokens, ts, te, vocab)
        if side is None:
            side = vocab.default_side.get(organ, "none")
        out.add((ftype, organ, side))
    return out


def _adjacent_side(
    sides: list[tuple[int, int]], tokens: list[str], start: int, end: int, vocab: Vocabulary, window: int = 3
) -> str | None:
    """Side word within `window` tokens before the span (e.g. "left kidney") or right after it."""
    before = [(s, e) for s, e in sides if e <= start and start - e < window]
    if before:
        s, e = max(before)
        return vocab.sides[tuple(tokens[s:e])]
    after = [(s, e) for s, e in sides if s >= end and s - end < 2]
    if after:
        s, e = min(after)
        return vocab.sides[tuple(tokens[s:e])]
    return None


def split_clauses(text: str) -> list[str]:
    """Negation scopes: sentences/clauses of `text`."""
    return [c for c in _CLAUSE_SPLIT.split(text or "") if c and c.strip()]


def extract_findings(text: str, vocab: Vocabulary | None = None) -> set[Finding]:
    """Positive findings `(type, organ, side)` in a report; negated mentions are dropped."""
    vocab = vocab or load_vocabulary()
    out: set[Finding] = set()
    for clause in split_clauses(text):
        out |= _clause_findings(list(_tok(clause)), vocab)
    return out


# ------------------------------------------------------------------------------------------------ scores
def finding_counts(predicted: set[Finding], reference: set[Finding]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one case."""
    tp = len(predicted & reference)
    return tp, len(predicted - reference), len(reference - predicted)


def _prf_from_sums(sums: np.ndarray) -> np.ndarray:
    """(..., 3) summed (tp, fp, fn) -> (..., 3) precision, recall, F1 (1.0 where nothing was due and nothing said)."""
    tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), np.where(fn > 0, 0.0, 1.0))
        r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1e-12), 1.0)
        f = np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12), 1.0)
    return np.stack([p, r, f], axis=-1)


def case_scores(predicted: set[Finding], reference: set[Finding]) -> dict[str, float]:
    """Per-case precision, recall and F1 (a correct 'no findings' report scores 1)."""
    p, r, f = _prf_from_sums(np.array(finding_counts(predicted, reference), dtype=np.float64))
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def finding_figures(
    predictions: Sequence[str], references: Sequence[str], vocab: Vocabulary | None = None, **bootstrap: Any
) -> tuple[dict[str, Figure], list[dict[str, Any]]]:
    """Micro finding-level precision/recall/F1 over cases (bootstrap over cases), plus mean per-case F1.

    ``vocab``: the extractor's vocabulary (default :func:`load_vocabulary`; pass ``load_vocabulary(schema)`` to
    score in a model's label schema). -> (figures, per_case) with per_case[i] = {"predicted", "reference", "tp",
    "fp", "fn", "f1"}.
    """
    vocab = vocab or load_vocabulary()
    per_case, counts = [], []
    for pred, ref in zip(predictions, references):
        ps, rs = extract_findings(pred, vocab), extract_findings(ref, vocab)
        c = finding_counts(ps, rs)
        counts.append(c)
        per_case.append({"predicted": sorted(ps), "reference": sorted(rs), "tp": c[0], "fp": c[1], "fn": c[2],
                         "f1": case_scores(ps, rs)["f1"]})
    stats = np.asarray(counts, dtype=np.float64).reshape(-1, 3)
    figures = {
        f"finding_{name}": bootstrap_figure(stats, statistic=lambda s, k=k: _prf_from_sums(s)[..., k], **bootstrap)
        for k, name in enumerate(("precision", "recall", "f1"))
    }
    figures["finding_f1_per_case"] = bootstrap_figure([c["f1"] for c in per_case], **bootstrap)
    return figures, per_case


def positives(texts: Iterable[str]) -> list[set[Finding]]:
    """`extract_findings` over many texts."""
    vocab = load_vocabulary()
    return [extract_findings(t, vocab) for t in texts]
