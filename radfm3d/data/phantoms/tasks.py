# Copyright (c) radfm3d contributors. Apache-2.0.
"""Task records (manifest lines) for a RadPhantom case, built from its ground truth with varied phrasings.

Tasks (``task`` field): ``report``, ``modality``, ``region``, ``vqa_presence``, ``vqa_side``, ``vqa_count``,
``vqa_type``, ``vqa_size``, ``open_location``, ``open_size``, ``grounding``, ``referring``, ``comparison``,
``comparison_report``, ``rationale``. Closed tasks carry ``choices`` (the answer is one of them, verbatim).
Boxes in text are ``<box>x1,y1,z1,x2,y2,z2</box>`` with integers 0-99 on the model grid (the case's
``grid_geometry``); every record's ``ground_truth`` holds the structured findings with world-mm boxes.

Phrasing choices come from the case's own text random stream, so the texts are as reproducible as the volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from radfm3d.data.phantoms.anatomy import FINDING_SITES, REGION_FINDING_ORGANS, organ_label

__all__ = ["TASKS", "STUDY_TASKS", "build_records", "build_study_records", "report_text", "report_with_structures",
           "finding_phrase", "size_bucket", "SIZE_BUCKETS"]

TASKS = ("report", "modality", "region", "vqa_presence", "vqa_side", "vqa_count", "vqa_type", "vqa_size",
         "open_location", "open_size", "grounding", "referring", "comparison", "comparison_report", "rationale")
#: tasks of multi-series studies (:func:`build_study_records`)
STUDY_TASKS = ("study_report",)

YES_NO = ["Yes.", "No."]
MODALITY_CHOICES = ["CT.", "MRI, T1-weighted.", "MRI, T2-weighted."]
REGION_CHOICES = ["Head.", "Chest.", "Abdomen."]
SIDE_CHOICES = ["Left.", "Right."]
COUNT_WORDS = ["None.", "One.", "Two.", "Three."]
SIZE_BUCKETS = [("Smaller than 10 mm.", 0, 10), ("10 to 20 mm.", 10, 20), ("20 to 30 mm.", 20, 30),
                ("Larger than 30 mm.", 30, 10_000)]
CHANGE_CHOICES = ["New.", "Grown.", "Shrunk.", "Resolved.", "Stable."]
TYPE_CHOICES = ["Nodule.", "Mass.", "Cyst.", "Hemorrhage.", "Calcification."]

_TYPE_WORDS = {
    "nodule": ("nodule", "solid nodule"), "mass": ("mass", "solid mass"), "cyst": ("cyst", "simple cyst"),
    "hemorrhage": ("hemorrhage", "parenchymal hemorrhage"), "calcification": ("calcification", "calcified focus"),
}
_PLURAL = {"nodule": "nodules", "mass": "masses", "cyst": "cysts", "hemorrhage": "hemorrhages",
           "calcification": "calcifications"}
_ORGAN_ADJ = {"kidney": "renal", "liver": "hepatic", "spleen": "splenic", "lung": "lung", "brain": "cerebral"}
_MODALITY_NAME = {"CT": "CT", "T1": "T1-weighted MRI", "T2": "T2-weighted MRI"}


def _mm(size: float | None) -> int:
    return int(round(float(size or 0.0)))


def size_bucket(size_mm: float) -> str:
    """Choice text of the size bucket of a finding (uses the size rounded to whole mm, as written in texts)."""
    s = _mm(size_mm)
    return next(name for name, lo, hi in SIZE_BUCKETS if lo <= s < hi)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def finding_phrase(f: dict[str, Any], rng: np.random.Generator | None = None) -> str:
    """Noun phrase of a finding, e.g. "a 14 mm cyst in the left kidney"."""
    words = _TYPE_WORDS[f["type"]]
    word = words[0] if rng is None else _pick(rng, words)
    article = "an" if str(_mm(f["size_mm"]))[0] == "8" or str(_mm(f["size_mm"])) in ("11", "18") else "a"
    return f"{article} {_mm(f['size_mm'])} mm {word} in the {f['location']}"


def _finding_sentence(f: dict[str, Any], rng: np.random.Generator) -> str:
    phrase = finding_phrase(f, rng)
    templates = ["There is {p}.", "{P} is seen.", "{P} is present.", "{P} is noted."]
    t = _pick(rng, templates)
    return t.format(p=phrase, P=_cap(phrase))


def _impression_item(f: dict[str, Any]) -> str:
    side = f"{f['side']} " if f["side"] in ("left", "right") else ""
    return f"{_mm(f['size_mm'])} mm {side}{_ORGAN_ADJ.get(f['organ'], f['organ'])} {f['type']}"


def _negatives(gt: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Explicit negative statements for structures without findings (parser-friendly wording)."""
    return [text for text, _, _ in _negative_sentences(gt, rng)]


def _negative_sentences(gt: dict[str, Any], rng: np.random.Generator) -> list[tuple[str, str, str | None]]:
    """(sentence, organ, side or None for both sides) of each negative statement, in report order."""
    found = {(f["organ"], f["side"]) for f in gt["findings"]}
    types = {f["type"] for f in gt["findings"]}
    out: list[tuple[str, str, str | None]] = []
    region = gt["region"]
    if region == "head":
        for side in ("right", "left"):
            if ("brain", side) not in found:
                out.append((_pick(rng, [f"The {side} cerebral hemisphere is unremarkable.",
                                        f"No focal lesion in the {side} cerebral hemisphere."]), "brain", side))
        if "hemorrhage" not in types:
            out.append((_pick(rng, ["No intracranial hemorrhage.", "There is no intracranial hemorrhage."]),
                        "brain", None))
        out.append((_pick(rng, ["The ventricles are normal in size.", "Normal ventricular size."]), "ventricles",
                    None))
        out.append((_pick(rng, ["The calvarium is intact.", "No skull abnormality."]), "skull", "none"))
    elif region == "chest":
        for side in ("right", "left"):
            if ("lung", side) not in found:
                out.append((_pick(rng, [f"The {side} lung is clear.", f"No nodule or mass in the {side} lung."]),
                            "lung", side))
        out.append((_pick(rng, ["Heart size is normal.", "The heart is not enlarged."]), "heart", "none"))
        out.append((_pick(rng, ["No pleural effusion.", "No effusion."]), "lung", None))
    else:
        if ("liver", "none") not in found:
            out.append((_pick(rng, ["No focal liver lesion.", "The liver is unremarkable."]), "liver", "none"))
        if ("spleen", "none") not in found:
            out.append((_pick(rng, ["No focal splenic lesion.", "The spleen is unremarkable."]), "spleen", "none"))
        for side in ("right", "left"):
            if ("kidney", side) not in found:
                out.append((_pick(rng, [f"The {side} kidney is unremarkable.", f"No {side} renal cyst or mass."]),
                            "kidney", side))
    return out


def report_text(gt: dict[str, Any], rng: np.random.Generator) -> tuple[str, str, str]:
    """(full report, findings section, impression section) of a case."""
    full, findings, impression, _ = report_with_structures(gt, rng)
    return full, findings, impression


def report_with_structures(gt: dict[str, Any], rng: np.random.Generator
                           ) -> tuple[str, str, str, list[dict[str, Any]]]:
    """(full report, findings section, impression section, report_structures) of a case or study.

    ``report_structures`` has one entry per sentence of the findings and the impression: ``text`` (the sentence as
    written), ``structure`` (``organ`` or ``organ/side``; both sides of a paired organ: the organ alone) and
    ``box_world_mm`` (the structure's box: the union of its organs' boxes in ``gt["organs"]``, world RAS mm clipped
    to the field of view). A finding's sentence gets the box of the organ that holds it (the finding's own box is in
    ``ground_truth``); an impression without findings gets ``structure`` "study" and no box. Draws from ``rng``
    exactly as :func:`report_text` did before structures were recorded, so the texts are unchanged."""
    positives = [(_finding_sentence(f, rng), f["organ"], f["side"]) for f in gt["findings"]]
    sentences = positives + _negative_sentences(gt, rng)
    findings = " ".join(text for text, _, _ in sentences)
    items = [(_cap(_impression_item(f)) + ".", f["organ"], f["side"]) for f in gt["findings"]]
    impression = impression_text(gt, rng)
    structures = [_structure_entry(gt, text, organ, side) for text, organ, side in sentences + items]
    if not items:
        structures.append({"text": impression, "structure": "study"})
    return f"FINDINGS: {findings} IMPRESSION: {impression}", findings, impression, structures


def _structure_entry(gt: dict[str, Any], text: str, organ: str, side: str | None) -> dict[str, Any]:
    """A ``report_structures`` entry: the sentence, its structure name and the union box of the structure's organs."""
    name = f"{organ}/{side}" if side in ("left", "right") else organ
    boxes = [o["box_world_mm"] for o in gt.get("organs", [])
             if o["organ"] == organ and (side is None or o["side"] == side)]
    entry: dict[str, Any] = {"text": text, "structure": name}
    if boxes:
        b = np.asarray(boxes, dtype=np.float64)
        entry["box_world_mm"] = [*b[:, :3].min(axis=0).tolist(), *b[:, 3:].max(axis=0).tolist()]
    return entry


def impression_text(gt: dict[str, Any], rng: np.random.Generator) -> str:
    items = [_impression_item(f) for f in gt["findings"]]
    if not items:
        return _pick(rng, ["No focal abnormality.", "Normal study without focal lesion."])
    if len(items) == 1:
        return _cap(items[0]) + "."
    return " ".join(f"{k + 1}. {_cap(it)}." for k, it in enumerate(items))


# --------------------------------------------------------------------------------------------- record helpers
def _gt_common(gt: dict[str, Any]) -> dict[str, Any]:
    return {"case_id": gt["case_id"], "modality": gt["modality"], "sequence": gt["sequence"],
            "region": gt["region"], "findings": gt["findings"]}


def _visit_ids(gt: dict[str, Any]) -> dict[str, str]:
    """``study_id`` / ``patient_id`` of a case's records: every case (with its prior) is one patient's visit."""
    return {"study_id": gt.get("study_id", gt["case_id"]),
            "patient_id": gt.get("patient_id", f"patient-{gt['case_id']}")}


def _unique(findings: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Findings whose values of ``key`` are unique in the case (so a question naming them is unambiguous)."""
    vals = [tuple(f[k] for k in key) for f in findings]
    return [f for f, v in zip(findings, vals) if vals.count(v) == 1]


def build_records(gt: dict[str, Any], images: Sequence[str], prior_image: str | None = None, *,
                  rng: np.random.Generator, tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Manifest records of one case.

    Args:
        gt: ground truth from :func:`radfm3d.data.phantoms.render.render_case`.
        images: the current scan's path(s) relative to the manifest folder (first one is used).
        prior_image: the prior scan's path (comparison tasks) or None.
        rng: the case's text stream.
        tasks: subset of :data:`TASKS` (default: all that apply).
    """
    wanted = set(TASKS if tasks is None else tasks)
    unknown = wanted - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {', '.join(TASKS)}")
    img = [str(images[0])]
    cid = gt["case_id"]
    findings = gt["findings"]
    mod_key = gt["sequence"] or gt["modality"]
    recs: list[dict[str, Any]] = []
    counters: dict[str, int] = {}

    def add(task: str, prompt: str, answer: str, choices: list[str] | None = None, extra: dict | None = None,
            imgs: list[str] | None = None) -> None:
        k = counters.get(task, 0)
        counters[task] = k + 1
        rec: dict[str, Any] = {"id": f"{cid}-{task}-{k}", "case_id": cid, "images": imgs or img,
                               "modality": gt["modality"], "region": gt["region"], "task": task,
                               "prompt": prompt, "answer": answer}
        if choices is not None:
            rec["choices"] = list(choices)
        rec["ground_truth"] = {**_gt_common(gt), **(extra or {})}
        rec.update(_visit_ids(gt))
        recs.append(rec)

    # report ------------------------------------------------------------------------------
    full, find_sec, impression, structures = report_with_structures(gt, rng)
    if "report" in wanted:
        p = _pick(rng, ["<image> Write the radiology report for this {m} of the {r}.",
                        "<image> Describe the findings of this scan.",
                        "<image> Please provide the FINDINGS and IMPRESSION for this study.",
                        "<image> Generate a radiology report."])
        add("report", p.format(m=_MODALITY_NAME[mod_key], r=gt["region"]), full)
        recs[-1]["report_structures"] = structures
    # modality / region ---------------------------------------------------------------------
    if "modality" in wanted:
        p = _pick(rng, ["<image> What is the imaging modality?", "<image> Which modality was used for this scan?",
                        "<image> Is this a CT or an MRI scan (and which weighting)?"])
        ans = {"CT": "CT.", "T1": "MRI, T1-weighted.", "T2": "MRI, T2-weighted."}[mod_key]
        add("modality", p, ans, MODALITY_CHOICES)
    if "region" in wanted:
        p = _pick(rng, ["<image> Which body region is shown?", "<image> What part of the body was scanned?",
                        "<image> Is this a scan of the head, chest or abdomen?"])
        add("region", p, _cap(gt["region"]) + ".", REGION_CHOICES)
    # closed VQA ----------------------------------------------------------------------------
    sites = REGION_FINDING_ORGANS[gt["region"]]
    if "vqa_presence" in wanted:
        present = {(f["type"], f["organ"], f["side"]) for f in findings}
        absent = [(t, o, s) for o, s in sites for t in FINDING_SITES[o] if (t, o, s) not in present
                  and not (gt["modality"] == "MR" and o == "lung" and t == "calcification")]
        if findings and (rng.random() < 0.5 or not absent):
            f = findings[int(rng.integers(len(findings)))]
            target, ans = (f["type"], f["organ"], f["side"]), "Yes."
        else:
            target, ans = absent[int(rng.integers(len(absent)))], "No."
        t, o, s = target
        p = _pick(rng, ["<image> Is there a {t} in the {l}?", "<image> Does the {l} contain a {t}?",
                        "<image> Is a {t} present in the {l}?"])
        add("vqa_presence", p.format(t=t, l=organ_label(o, s)), ans, YES_NO,
            {"question": {"type": t, "organ": o, "side": s}})
    paired = [f for f in _unique(findings, ("type", "organ")) if f["organ"] in ("lung", "kidney", "brain")]
    if "vqa_side" in wanted and paired:
        f = paired[int(rng.integers(len(paired)))]
        generic = {"lung": "lung", "kidney": "kidney", "brain": "cerebral hemisphere"}[f["organ"]]
        p = _pick(rng, ["<image> Which {g} contains the {t}?", "<image> Is the {t} in the left or the right {g}?",
                        "<image> On which side is the {t}?"])
        add("vqa_side", p.format(g=generic, t=f["type"]), _cap(f["side"]) + ".", SIDE_CHOICES,
            {"target_ids": [f["id"]]})
    if "vqa_count" in wanted:
        if findings and rng.random() < 0.5:
            t = findings[int(rng.integers(len(findings)))]["type"]
            n = sum(f["type"] == t for f in findings)
            p = _pick(rng, ["<image> How many {tp} are there?", "<image> Count the {tp} in this scan."])
            add("vqa_count", p.format(tp=_PLURAL[t]), COUNT_WORDS[n], COUNT_WORDS, {"question": {"type": t}})
        else:
            p = _pick(rng, ["<image> How many focal lesions are there?",
                            "<image> How many abnormal findings does this scan show?"])
            add("vqa_count", p, COUNT_WORDS[len(findings)], COUNT_WORDS)
    by_loc = _unique(findings, ("organ", "side"))
    if "vqa_type" in wanted and by_loc:
        f = by_loc[int(rng.integers(len(by_loc)))]
        choices = [c for c in TYPE_CHOICES if c[:-1].lower() in FINDING_SITES[f["organ"]]]
        p = _pick(rng, ["<image> What type of lesion is in the {l}?", "<image> What is the lesion in the {l}?",
                        "<image> Which kind of finding is present in the {l}?"])
        add("vqa_type", p.format(l=f["location"]), _cap(f["type"]) + ".", choices, {"target_ids": [f["id"]]})
    by_type_loc = _unique(findings, ("type", "organ", "side"))
    if "vqa_size" in wanted and by_type_loc:
        f = by_type_loc[int(rng.integers(len(by_type_loc)))]
        p = _pick(rng, ["<image> What is the size of the {t} in the {l}?", "<image> How big is the {t} in the {l}?"])
        add("vqa_size", p.format(t=f["type"], l=f["location"]), size_bucket(f["size_mm"]),
            [b[0] for b in SIZE_BUCKETS], {"target_ids": [f["id"]]})
    # open VQA ------------------------------------------------------------------------------
    by_type = _unique(findings, ("type",))
    if "open_location" in wanted and by_type:
        f = by_type[int(rng.integers(len(by_type)))]
        p = _pick(rng, ["<image> Where is the {t}?", "<image> Where is the {t} located?",
                        "<image> In which organ is the {t}?"])
        add("open_location", p.format(t=f["type"]), f"In the {f['location']}.", None, {"target_ids": [f["id"]]})
    if "open_size" in wanted and findings:
        t = findings[int(rng.integers(len(findings)))]["type"]
        f = max((x for x in findings if x["type"] == t), key=lambda x: x["size_mm"])
        if sum(x["type"] == t for x in findings) > 1:
            p = _pick(rng, ["<image> How large is the largest {t}?", "<image> What is the size of the largest {t}?"])
        else:
            p = _pick(rng, ["<image> How large is the {t}?", "<image> What is the longest diameter of the {t}?"])
        add("open_size", p.format(t=t), f"About {_mm(f['size_mm'])} mm.", None,
            {"target_ids": [f["id"]], "size_mm": f["size_mm"]})
    # grounding / referring -------------------------------------------------------------------
    geom = gt.get("grid_geometry")
    if geom is not None and "box_text" in (findings[0] if findings else {"box_text": ""}):
        if "grounding" in wanted:
            for f in by_type_loc[:2]:
                p = _pick(rng, ["<image> Locate the {t} in the {l}.",
                                "<image> Find the {t} in the {l} and give its box.",
                                "<image> Draw a bounding box around the {t} in the {l}."])
                add("grounding", p.format(t=f["type"], l=f["location"]), f["box_text"], None,
                    {"target": f, "target_ids": [f["id"]], "grid_geometry": geom})
            organs = [o for o in gt.get("organs", []) if "box_text" in o and o["organ"] in _ORGAN_ADJ]
            if organs and (not findings or rng.random() < 0.3):
                o = organs[int(rng.integers(len(organs)))]
                p = _pick(rng, ["<image> Locate the {l}.", "<image> Give the bounding box of the {l}."])
                add("grounding", p.format(l=o["location"]), o["box_text"], None,
                    {"target": o, "grid_geometry": geom})
        if "referring" in wanted and findings:
            f = findings[int(rng.integers(len(findings)))]
            p = _pick(rng, ["<image> What is in {b}?", "<image> Describe the finding inside {b}.",
                            "<image> What abnormality is located at {b}?"])
            add("referring", p.format(b=f["box_text"]), _cap(finding_phrase(f)) + ".", None,
                {"target": f, "target_ids": [f["id"]], "grid_geometry": geom})
    # comparison -----------------------------------------------------------------------------
    prior = gt.get("prior")
    if prior is not None and prior_image is not None:
        pair = [str(prior_image), img[0]]
        intro = _pick(rng, ["<image> <image> The first image is the prior scan, the second the current scan.",
                            "<image> is the prior study and <image> the current one."])
        changes = prior["changes"]
        if "comparison" in wanted and changes:
            cands = [c for c in changes
                     if sum((d["type"], d["organ"], d["side"]) == (c["type"], c["organ"], c["side"])
                            for d in changes) == 1]
            if cands:
                c = cands[int(rng.integers(len(cands)))]
                q = _pick(rng, [" How has the {t} in the {l} changed?", " Compared with the prior, what happened to "
                                "the {t} in the {l}?"])
                add("comparison", intro + q.format(t=c["type"], l=organ_label(c["organ"], c["side"])),
                    _cap(c["change"]) + ".", CHANGE_CHOICES, {"change": c, "prior_findings": prior["findings"]},
                    imgs=pair)
        if "comparison_report" in wanted:
            q = _pick(rng, [" Compare the current scan with the prior.", " Describe the interval change."])
            add("comparison_report", intro + q, comparison_text(changes),
                None, {"changes": changes, "prior_findings": prior["findings"]}, imgs=pair)
    # rationale ------------------------------------------------------------------------------
    if "rationale" in wanted:
        p = _pick(rng, ["<image> The impression is: \"{i}\" Which findings support it?",
                        "<image> Explain which imaging findings support this impression: {i}"])
        support = " ".join(_cap(finding_phrase(f)) + "." for f in findings) if findings else \
            "No focal lesion is seen in any of the imaged organs."
        add("rationale", p.format(i=impression), support)
    return recs


def build_study_records(gt: dict[str, Any], images: Sequence[str], *, rng: np.random.Generator,
                        tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Manifest records of a multi-series study (:func:`radfm3d.data.phantoms.render.render_study`).

    ``study_report``: several scans -> one report. ``images`` are the series (in ``gt["series"]`` order), the prompt
    has one ``<image>`` per series and names their modalities, the answer is one report of the study (the same
    wording as a single scan's), with ``image_modalities`` (e.g. ``["CT", "MR T1", "MR T2"]``), ``study_id``,
    ``patient_id`` and ``report_structures`` (:func:`report_with_structures`).
    """
    wanted = set(STUDY_TASKS if tasks is None else tasks)
    if len(images) != len(gt["series"]):
        raise ValueError(f"{len(images)} image(s) for a study of {len(gt['series'])} series")
    full, _, _, structures = report_with_structures(gt, rng)
    if "study_report" not in wanted:
        return []
    names = [_MODALITY_NAME[s["sequence"] or s["modality"]] for s in gt["series"]]
    template = int(rng.integers(3))
    if template == 0:
        prompt = "\n".join(f"Series {k + 1} ({n}): <image>" for k, n in enumerate(names)) + \
            "\nWrite the radiology report for this study."
    elif template == 1:
        prompt = " ".join(f"{n}: <image>" for n in names) + f" Describe the findings of this {gt['region']} study."
    else:
        prompt = "<image> " * len(names) + f"These are the {', '.join(names)} series of one visit. Write one report."
    series = [{k: s[k] for k in ("modality", "sequence", "grid_geometry", "findings")} for s in gt["series"]]
    return [{"id": f"{gt['study_id']}-study_report-0", "case_id": gt["study_id"], "images": [str(p) for p in images],
             "modality": gt["modality"], "region": gt["region"], "task": "study_report", "prompt": prompt,
             "answer": full, "image_modalities": [s["modality"] + (f" {s['sequence']}" if s["sequence"] else "")
                                                  for s in gt["series"]],
             "study_id": gt["study_id"], "patient_id": gt["patient_id"], "report_structures": structures,
             "ground_truth": {**_gt_common(gt), "series": series}}]


def comparison_text(changes: list[dict[str, Any]]) -> str:
    """Interval change sentences, e.g. "The cyst in the left kidney has grown from 10 mm to 14 mm."."""
    if not changes:
        return "No focal lesion on either scan; no interval change."
    out = []
    for c in changes:
        what = f"the {c['type']} in the {organ_label(c['organ'], c['side'])}"
        kind = c["change"]
        if kind == "new":
            out.append(f"New {_mm(c['size_mm'])} mm {c['type']} in the {organ_label(c['organ'], c['side'])}.")
        elif kind == "resolved":
            out.append(f"{_cap(what)} has resolved.")
        elif kind == "stable":
            out.append(f"{_cap(what)} is stable at {_mm(c['size_mm'])} mm.")
        else:
            verb = "grown" if kind == "grown" else "shrunk"
            out.append(f"{_cap(what)} has {verb} from {_mm(c['prior_size_mm'])} mm to {_mm(c['size_mm'])} mm.")
    return " ".join(out)
