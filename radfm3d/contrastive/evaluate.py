# Copyright (c) radfm3d contributors. Apache-2.0.
"""`radfm3d evaluate-clip`: embed a manifest's report records with a contrastive image-report model (or read the
embeddings file of any other model) and score them with :mod:`radfm3d.evaluation.embeddings`.

    radfm3d evaluate-clip --model clip_model --manifest data/phantoms/test.jsonl --out eval/clip \\
        --train-manifest data/phantoms/train.jsonl

Zero-shot classes and labels:

- classes come from a label schema (``--label-schema``; default the model folder's ``label_schema.json`` when it
  names flags or finding types; else, when no evaluated record carries labels, the phantom benchmark's
  ``phantom_flags`` schema): its ``flags``, or when it has none its ``finding_types`` (a class per type: "the scan
  holds a finding of this type"); without a schema, the keys of the records' ``labels`` dicts;
- a record's label is its ``labels[class]`` (0 / 1) when it has a ``labels`` dict (as the CT-RATE importer
  writes), else derived from its ``ground_truth`` findings (flags with
  :func:`radfm3d.findings.labels.labels_for_image`); -1 (unknown) otherwise;
- a class's score is the model's log-odds of "present" vs "absent" prompts (:data:`PRESENT_TEMPLATES`,
  :data:`ABSENT_TEMPLATES` around the class's schema phrase; each side's text embeddings are L2-normalised and
  averaged over the phrasings, then normalised again);
- with the structure level, the same prompts are also scored on the region embedding of each class's structure
  (the ``organ`` of its flag's rules; every structure for a class without one), the highest over the record's
  regions of that structure: an organ-level zero-shot (:func:`structure_zero_shot_scores`). The regions are the
  boxes or masks of ``report_structures``: on real data give them from a segmentation of the structures, so that
  nothing about the finding's place comes from the report.

Running a model appends each record's embeddings to ``OUT/<name>/test_embeddings.jsonl`` (``train_...`` for the
training manifest) as they are made; a rerun skips what that file holds. The embeddings file
``OUT/<name>/test_embeddings.npz`` (the format of
:mod:`radfm3d.evaluation.embeddings`) is written at the end; the same format from any other model is scored by
``--predictions``.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from radfm3d.errors import RadFM3DInputError
from radfm3d.evaluation import embeddings as E
from radfm3d.evaluation.metrics import BOOTSTRAP_SEED, N_RESAMPLES
from radfm3d.utils import JsonlAppender, atomic_write_json, is_unset

__all__ = ["CLIP_TASKS", "PRESENT_TEMPLATES", "ABSENT_TEMPLATES", "report_records", "zero_shot_classes",
           "prompt_embeddings", "class_structures", "structure_zero_shot_scores",
           "record_labels", "record_strata", "class_prompts", "embed_manifest", "cli"]

#: manifest tasks whose records pair images with a report
CLIP_TASKS = ("report", "study_report")
#: "finding present" phrasings; {} is the class phrase
PRESENT_TEMPLATES = ("There is a {}.", "{} is present.", "Findings consistent with {}.")
#: "finding absent" phrasings
ABSENT_TEMPLATES = ("No {}.", "There is no {}.", "No evidence of {}.")
DEFAULT_SCHEMA = "phantom_flags"
#: the record key whose value is each record's stratum for the within-stratum AUROC
DEFAULT_STRATIFY_BY = "region"


# -------------------------------------------------------------------------------------------- records
def report_records(manifest: str | os.PathLike, tasks: Sequence[str] | None = CLIP_TASKS,
                   limit: int | None = None) -> list[dict[str, Any]]:
    """The manifest's records whose ``task`` is in ``tasks`` (None: every record with an ``answer``), image and
    ``report_structures`` mask paths absolute (:func:`radfm3d.contrastive.data.clip_records`, as training reads
    them). Raises RadFM3DInputError naming the manifest when it is missing or none is left."""
    from radfm3d.contrastive.data import clip_records

    path = Path(manifest)
    if not path.is_file():
        raise RadFM3DInputError(path, "manifest not found")
    out = [r for r in clip_records(path, tasks=tasks, limit=limit) if r.get("answer") is not None]
    if not out:
        raise RadFM3DInputError(path, f"no records of task(s) {list(tasks or [])}; nothing to embed")
    return out


# --------------------------------------------------------------------------------------------- classes
def zero_shot_classes(schema: Any = None, records: Sequence[Mapping[str, Any]] = ()) -> tuple[list[str], list[str]]:
    """-> (class names, their phrases) from a label schema (flags, else finding types), or without one from the
    keys of the records' ``labels`` dicts (phrase: the name with spaces for underscores)."""
    if schema is not None:
        from radfm3d.findings.schema import load_schema

        s = load_schema(schema)
        kind = "flag" if s.flags else "type"
        names = list(s.flags or s.finding_types)
        if not names:
            raise RadFM3DInputError(f"label schema {s.name!r}", "has neither flags nor finding types to score")
        return names, [s.phrases[f"{kind}:{n}"].strip() for n in names]
    names: list[str] = []
    for r in records:
        for key in _given_labels(r):
            if key not in names:
                names.append(str(key))
    return names, [n.replace("_", " ") for n in names]


def record_labels(records: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                  schema: Any = None) -> np.ndarray:
    """(N, K) int8 labels: a record's ``labels[class]`` where given, else from
    its ``ground_truth`` findings with the schema (flags via :func:`radfm3d.findings.labels.labels_for_image`;
    finding types: any finding of the type); -1 where neither says."""
    from radfm3d.findings.labels import labels_for_image
    from radfm3d.findings.schema import LabelSchema, load_schema

    s = load_schema(schema) if schema is not None else None
    flags_only = LabelSchema({**s.to_dict(), "outputs": ["flags"]}) if s is not None and s.flags else None
    out = np.full((len(records), len(class_names)), -1, dtype=np.int8)
    for i, r in enumerate(records):
        given = _given_labels(r)
        if given:
            for k, name in enumerate(class_names):
                if name in given and given[name] in (0, 1, True, False):
                    out[i, k] = int(given[name])
            if (out[i] >= 0).all():
                continue
        gt = r.get("ground_truth")
        if s is None or not isinstance(gt, Mapping) or "findings" not in gt:
            continue
        if flags_only is not None:
            try:
                flags = labels_for_image({"findings": gt.get("findings") or [], "flags": gt.get("flags") or []},
                                         flags_only)["flags"]
            except (KeyError, TypeError, ValueError) as err:
                raise RadFM3DInputError(f"record {r.get('id')}", f"ground_truth findings unreadable: {err}") from None
            derived = {n: int(v) for n, v in zip(s.flags, flags.tolist())}
        else:
            types = {str(f.get("type")) for f in gt.get("findings") or []}
            derived = {t: int(t in types) for t in s.finding_types}
        for k, name in enumerate(class_names):
            if out[i, k] < 0 and name in derived:
                out[i, k] = derived[name]
    return out


def record_strata(records: Sequence[Mapping[str, Any]], key: str | None) -> np.ndarray | None:
    """(N,) str: each record's ``key`` (else its ``ground_truth[key]``) as its stratum, ``"(no KEY)"`` where neither
    has it; None when ``key`` is None / ``"none"`` or no record has it."""
    if is_unset(key):
        return None
    values = []
    for r in records:
        gt = r.get("ground_truth")
        v = r.get(key, gt.get(key) if isinstance(gt, Mapping) else None)
        values.append(None if v is None else str(v))
    if all(v is None for v in values):
        return None
    return np.array([f"(no {key})" if v is None else v for v in values])


def _given_labels(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """A record's own labels: its ``labels`` dict (e.g. CT-RATE's 18 abnormalities from ``radfm3d import ct-rate``),
    else {}."""
    labels = record.get("labels")
    return labels if isinstance(labels, Mapping) else {}


def class_prompts(phrases: Sequence[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Per class, its "present" and "absent" prompt texts."""
    return ([[t.format(p) for t in PRESENT_TEMPLATES] for p in phrases],
            [[t.format(p) for t in ABSENT_TEMPLATES] for p in phrases])


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


# ----------------------------------------------------------------------------------------- model running
def _encode_texts(model: Any, processor: Any, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """(T, P) projected text embeddings (not normalised) of ``texts``."""
    import torch

    out = []
    for start in range(0, len(texts), batch_size):
        enc = processor.tokenize(list(texts[start: start + batch_size]))
        with torch.inference_mode():
            feats = model.get_text_features(enc["input_ids"], enc["attention_mask"])
        out.append(feats.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _series_modalities(record: Mapping[str, Any], n: int) -> list[str | None]:
    """Per image, the modality that picks its intensity scaling ("CT", "MR"): the first word of the record's
    ``image_modalities`` entry, else None (read from the file)."""
    mods = record.get("image_modalities")
    if isinstance(mods, list) and len(mods) == n:
        return [str(m).split()[0].upper() if m else None for m in mods]
    return [None] * n


def _record_series(processor: Any, record: Mapping[str, Any]) -> list[tuple[Any, dict]]:
    """A record's series preprocessed on the model grid: ``[((C, H, W, D) float32, GridGeometry dict), ...]``."""
    from radfm3d.data.image_meta import record_images

    images = record_images(record)
    if not images:
        raise RadFM3DInputError(f"record {record.get('id')}", "has no images")
    return [processor.preprocess_image(img, mod) for img, mod in zip(images, _series_modalities(record, len(images)))]


def _image_embeddings(model: Any, processor: Any, series: Sequence[Sequence[Any]]) -> np.ndarray:
    """(B, P) image embeddings of B records' preprocessed series: a single series' embedding, or the model's fused
    study embedding of several (:meth:`RadFM3DCLIPModel.get_image_features` with ``(1, S, C, H, W, D)``).
    Single series of one grid shape run as one batch; nothing is padded into a single series' grid (padding would
    change its embedding)."""
    import torch

    out: list[Any] = [None] * len(series)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(series):
        if len(item) == 1:
            by_shape.setdefault(tuple(item[0].shape), []).append(i)
    with torch.inference_mode():
        for rows in by_shape.values():
            feats = model.get_image_features(torch.stack([series[i][0] for i in rows])).float().cpu().numpy()
            for i, f in zip(rows, feats):
                out[i] = f
        for i, item in enumerate(series):
            if len(item) > 1:
                pixel_values, image_mask = processor.stack_images([list(item)])
                out[i] = model.get_image_features(pixel_values, image_mask)[0].float().cpu().numpy()
    return np.stack(out)


def _structure_rows(model: Any, processor: Any, boxer: Any, record: Mapping[str, Any],
                    series: Sequence[tuple[Any, dict]]) -> list[dict[str, Any]]:
    """The record's structure level: for each ``report_structures`` sentence with a box (or mask) and each series
    whose grid sees it (:func:`radfm3d.contrastive.data.grid_extent_of_world_box`, as training builds the rows),
    the region embedding (:meth:`RadFM3DCLIPModel.get_structure_features`, as the training structure level pools it)
    and the sentence embedding, both L2-normalised.
    -> ``[{"series", "region" (the grid box as text), "text", "image_embeds", "text_embeds"}]``."""
    import torch
    import torch.nn.functional as F

    from radfm3d.contrastive.data import grid_extent_of_world_box

    index, boxes, texts, names = [], [], [], []
    for entry in record.get("report_structures") or []:
        box = boxer.structure_world_box(entry)
        if box is None:
            continue
        for s, (_, geometry) in enumerate(series):
            extent = grid_extent_of_world_box(box, geometry, boxer.min_visible_fraction)
            if extent is not None:
                index.append((0, s))
                boxes.append(extent)
                texts.append(str(entry["text"]))
                names.append(str(entry.get("structure") or ""))
    if not texts:
        return []
    pixel_values, image_mask = processor.stack_images([[t for t, _ in series]])  # one grid shape, as in training
    enc = processor.tokenize(texts)
    with torch.inference_mode():
        regions = model.get_structure_features(pixel_values[0][image_mask[0]],
                                               torch.tensor(np.asarray(boxes, dtype=np.float32)),
                                               torch.tensor([s for _, s in index], dtype=torch.long))
        sentences = model.get_text_features(enc["input_ids"], enc["attention_mask"])
    regions, sentences = (F.normalize(x.float(), dim=-1).cpu().numpy() for x in (regions, sentences))
    return [{"series": s, "region": ",".join(f"{v:.2f}" for v in box), "structure": name, "text": text,
             "image_embeds": r.tolist(), "text_embeds": t.tolist()}
            for (_, s), box, name, text, r, t in zip(index, boxes, names, texts, regions, sentences)]


def _unit_mean(x: np.ndarray) -> np.ndarray:
    x = x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)
    m = x.mean(axis=-2)
    return m / np.clip(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12, None)


def prompt_embeddings(model: Any, processor: Any, phrases: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the unit mean of its "present" prompts' embeddings and of its "absent" ones: two ``(K, P)``."""
    present, absent = class_prompts(phrases)
    k = len(phrases)
    flat = [_capitalise(t) for group in present + absent for t in group]
    emb = _encode_texts(model, processor, flat)
    n_p = len(PRESENT_TEMPLATES)
    return (_unit_mean(emb[: k * n_p].reshape(k, n_p, -1)),
            _unit_mean(emb[k * n_p:].reshape(k, len(ABSENT_TEMPLATES), -1)))


def zero_shot_scores(model: Any, processor: Any, image_embeds: np.ndarray, phrases: Sequence[str],
                     prompts: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(N, K) log-odds of "present" vs "absent" per class: ``model.zero_shot_logits`` of the image embeddings and
    the prompt-ensembled class embeddings (``prompts``: :func:`prompt_embeddings`, computed when not given)."""
    import torch

    pe, ae = prompts if prompts is not None else prompt_embeddings(model, processor, phrases)
    img = image_embeds / np.clip(np.linalg.norm(image_embeds, axis=1, keepdims=True), 1e-12, None)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model.zero_shot_logits(torch.as_tensor(img, dtype=torch.float32, device=dev),
                                     torch.as_tensor(pe, dtype=torch.float32, device=dev),
                                     torch.as_tensor(ae, dtype=torch.float32, device=dev))
    return out.float().cpu().numpy()


def class_structures(schema: Any, class_names: Sequence[str]) -> list[tuple[str, ...] | None]:
    """Per class, the structures whose regions it is scored on by the organ-level zero-shot: the ``organ`` of its
    schema flag's rules (``"kidney"`` covers ``"kidney/left"`` and ``"kidney/right"``), or None (every structure of
    the record) for a class that names no organ (finding types, a record's own ``labels``)."""
    if schema is None:
        return [None] * len(class_names)
    from radfm3d.findings.schema import load_schema

    s = load_schema(schema)
    organs = {str(entry["name"]): tuple(sorted({str(rule["organ"]) for rule in entry.get("rules") or []
                                                if rule.get("organ")}))
              for entry in s.flag_entries}
    return [organs.get(name) or None for name in class_names]


def _covers(structure: str, organs: tuple[str, ...] | None) -> bool:
    return bool(structure) and (organs is None or any(structure == o or structure.startswith(o + "/")
                                                      for o in organs))


def structure_zero_shot_scores(model: Any, rows: Sequence[Sequence[Mapping[str, Any]]],
                               structures: Sequence[tuple[str, ...] | None],
                               prompts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(N, K): per record (``rows[i]``: its structure rows from :func:`_structure_rows`) and class, the highest
    zero-shot log-odds over the regions of the class's ``structures`` (every series of the record); NaN where the
    record has none. Each (series, structure) region is scored once."""
    import torch

    pe, ae = prompts
    out = np.full((len(rows), len(structures)), np.nan, dtype=np.float32)
    owners, names, embeds = [], [], []  # one entry per (record, series, structure) region
    for i, record_rows in enumerate(rows):
        regions: dict[tuple[Any, str], list[float]] = {}
        for row in record_rows:
            regions.setdefault((row["series"], str(row.get("structure") or "")), row["image_embeds"])
        for (_, name), embed in regions.items():
            owners.append(i)
            names.append(name)
            embeds.append(embed)
    if not embeds:
        return out
    dev = next(model.parameters()).device
    with torch.inference_mode():
        logits = model.zero_shot_logits(torch.as_tensor(np.asarray(embeds, dtype=np.float32), device=dev),
                                        torch.as_tensor(pe, device=dev),
                                        torch.as_tensor(ae, device=dev)).float().cpu().numpy()  # (regions, K)
    owners_arr = np.asarray(owners)
    for k, organs in enumerate(structures):
        covered = np.array([_covers(name, organs) for name in names])
        if covered.any():
            scores = np.full(len(rows), -np.inf, dtype=np.float32)
            np.maximum.at(scores, owners_arr[covered], logits[covered, k])
            out[:, k] = np.where(np.isfinite(scores), scores, np.nan)
    return out


def embed_manifest(
    model: Any, processor: Any, manifest: str | os.PathLike | Sequence[Mapping[str, Any]],
    out: str | os.PathLike, *, label_schema: Any = None, tasks: Sequence[str] | None = CLIP_TASKS,
    limit: int | None = None, batch_size: int = 8, num_workers: int = 2, structures: bool = True,
    progress: bool = True,
    failures: list[dict[str, Any]] | None = None, stratify_by: str | None = DEFAULT_STRATIFY_BY,
) -> Path:
    """Embed every report record of ``manifest`` (a path or its records) and write the embeddings file ``out``.

    Each record's image embedding (its series', or the fused study embedding), its report's text embedding and
    report text are appended to ``out`` with suffix ``.jsonl`` as each batch of ``batch_size`` records is made, and
    a rerun skips the records that file holds; ``num_workers`` threads read and preprocess the next batch's scans
    while the model runs. ``structures``: also the structure level of records with ``report_structures``
    (:func:`_structure_rows`). Classes and labels (:func:`zero_shot_classes`,
    :func:`record_labels`) and the zero-shot scores (:func:`zero_shot_scores`, of the image embeddings and, as the
    prompts' text-side ceiling, of the report embeddings) are added when the schema or the records name classes.
    failures: a list that gets ``{"id", "images", "problem"}`` for each record that could not be embedded (then
    left out); without it the first failure raises. ``stratify_by``: the record key written as ``strata``
    (:func:`record_strata`; None: none). -> the path of the embeddings file.
    """
    from tqdm.auto import tqdm

    records = report_records(manifest, tasks, limit) if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    out = Path(out)
    cache = out.with_suffix(".jsonl")
    model.eval()
    done: dict[str, dict[str, Any]] = {}
    if cache.is_file():
        from radfm3d.data.manifest import read_jsonl

        for row in read_jsonl(cache, allow_partial_last_line=True):
            done[str(row["id"])] = row
    todo = [r for r in records if str(r["id"]) not in done]
    boxer = None
    if structures:
        from radfm3d.contrastive.data import ClipCollate

        boxer = ClipCollate(processor.tokenizer, processor.recipe)  # its world boxes of report_structures entries
    with JsonlAppender(cache) as appender:
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=f"embed {out.stem}",
                   disable=not progress)
        def fail(r: Mapping[str, Any], err: BaseException) -> None:
            if failures is None:
                raise err
            failures.append({"id": str(r["id"]), "images": list(r.get("images") or []),
                             "problem": str(err) if isinstance(err, RadFM3DInputError)
                             else f"{type(err).__name__}: {err}"})
            bar.update(1)

        def read(r: Mapping[str, Any]) -> list[Any] | BaseException:
            try:
                return _record_series(processor, r)
            except Exception as err:  # reported per record by fail()
                return err

        def run(batch: Sequence[Mapping[str, Any]], series: Sequence[Sequence[Any]]) -> None:
            try:
                images = _image_embeddings(model, processor, [[t for t, _ in item] for item in series])
                texts = _encode_texts(model, processor, [str(r.get("answer", "")) for r in batch])
                regions = [_structure_rows(model, processor, boxer, r, item) if structures else []
                           for r, item in zip(batch, series)]
            except Exception as err:
                if len(batch) > 1 and failures is not None:  # find the bad record(s); the others still get theirs
                    for r, item in zip(batch, series):
                        run([r], [item])
                    return
                fail(batch[0], err)
                return
            for r, image, text, rows in zip(batch, images, texts, regions):
                row = {"id": str(r["id"]), "report_text": str(r.get("answer", "")),
                       "image_embeds": image.tolist(), "text_embeds": text.tolist(), "structures": rows}
                appender.write(row)
                done[row["id"]] = row
            bar.update(len(batch))

        # scans are read and preprocessed by `num_workers` threads (file reading and decompression release the
        # GIL), the next batch while the model embeds the current one
        batches = [todo[start: start + batch_size] for start in range(0, len(todo), batch_size)]
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as readers, \
                ThreadPoolExecutor(max_workers=1) as prefetch:
            def load(batch: Sequence[Mapping[str, Any]]) -> list[Any]:
                return list(readers.map(read, batch))

            pending = prefetch.submit(load, batches[0]) if batches else None
            for i, batch in enumerate(batches):
                loaded = pending.result()
                if i + 1 < len(batches):
                    pending = prefetch.submit(load, batches[i + 1])
                for r, item in zip(batch, loaded):
                    if isinstance(item, BaseException):
                        fail(r, item)
                ok = [(r, item) for r, item in zip(batch, loaded) if not isinstance(item, BaseException)]
                if ok:
                    run([r for r, _ in ok], [item for _, item in ok])
        bar.close()
    kept = [r for r in records if str(r["id"]) in done]
    if not kept:
        raise RadFM3DInputError(out, "no record could be embedded")
    rows = [done[str(r["id"])] for r in kept]
    arrays: dict[str, Any] = {
        "record_ids": np.array([row["id"] for row in rows]),
        "image_embeds": np.array([row["image_embeds"] for row in rows], dtype=np.float32),
        "report_texts": np.array([str(r.get("answer", "")) for r in kept]),
        "text_embeds": np.array([row["text_embeds"] for row in rows], dtype=np.float32),
    }
    structure_rows = [(row["id"], s) for row in rows for s in row.get("structures") or []]
    if structure_rows:
        arrays.update({
            "structure_series": np.array([f"{rid}#{s['series']}" for rid, s in structure_rows]),
            "structure_regions": np.array([s["region"] for _, s in structure_rows]),
            "structure_texts": np.array([s["text"] for _, s in structure_rows]),
            "structure_embeds": np.array([s["image_embeds"] for _, s in structure_rows], dtype=np.float32),
            "structure_text_embeds": np.array([s["text_embeds"] for _, s in structure_rows], dtype=np.float32)})
    strata = record_strata(kept, stratify_by)
    if strata is not None:
        arrays["strata"] = strata
    names, phrases = zero_shot_classes(label_schema, kept)
    if names:
        arrays["class_names"] = np.array(names)
        arrays["labels"] = record_labels(kept, names, label_schema)
        prompts = prompt_embeddings(model, processor, phrases)
        arrays["zero_shot_scores"] = zero_shot_scores(model, processor, arrays["image_embeds"], phrases, prompts)
        arrays["report_zero_shot_scores"] = zero_shot_scores(model, processor, arrays["text_embeds"], phrases,
                                                             prompts)
        if structure_rows:
            arrays["structure_zero_shot_scores"] = structure_zero_shot_scores(
                model, [row.get("structures") or [] for row in rows], class_structures(label_schema, names), prompts)
    return E.save_embeddings(out, **arrays)


# ----------------------------------------------------------------------------------------- predictions
def resolve_labels(emb: E.Embeddings, records: Sequence[Mapping[str, Any]], schema: Any,
                   stratify_by: str | None = DEFAULT_STRATIFY_BY) -> tuple[E.Embeddings, dict[str, Any]]:
    """The embeddings of ``records`` (manifest order; records missing from the file left out) with the manifest's
    report texts, labels from the manifest (records' ``labels`` / ground truth with ``schema``) where it knows
    them, else the file's, and strata from the manifest's ``stratify_by`` key (:func:`record_strata`), else the
    file's (None / "none": no strata). -> (embeddings, {"missing", "text_mismatch", "label_conflicts"})."""
    have = set(emb.record_ids.tolist())
    kept = [r for r in records if str(r["id"]) in have]
    info: dict[str, Any] = {"missing": [str(r["id"]) for r in records if str(r["id"]) not in have]}
    if not kept:
        raise RadFM3DInputError(emb.source, "holds none of the manifest's report records (record_ids do not match)")
    sub = emb.subset([str(r["id"]) for r in kept])
    texts = np.array([str(r.get("answer", "")) for r in kept])
    info["text_mismatch"] = int(sum(E.normalize_report(a) != E.normalize_report(b)
                                    for a, b in zip(texts.tolist(), sub.report_texts.tolist())))
    sub.report_texts = texts
    if is_unset(stratify_by):
        sub.strata = None
    else:
        strata = record_strata(kept, stratify_by)
        sub.strata = strata if strata is not None else sub.strata
    if sub.class_names is not None:
        names = sub.class_names.tolist()
    else:
        names = zero_shot_classes(schema, kept)[0]
    info["label_conflicts"] = 0
    if names:
        manifest_labels = record_labels(kept, names, schema)
        file_labels = sub.labels if sub.labels is not None else np.full_like(manifest_labels, -1)
        both = (manifest_labels >= 0) & (file_labels >= 0)
        info["label_conflicts"] = int((both & (manifest_labels != file_labels)).sum())
        sub.class_names = np.array(names)
        sub.labels = np.where(manifest_labels >= 0, manifest_labels, file_labels).astype(np.int8)
    return sub, info


def _named(spec: str, what: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH`` -> (name or None, path)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if not name:
            raise RadFM3DInputError(spec, f"{what}: an empty NAME in NAME=PATH")
        return name, path
    return None, spec


# --------------------------------------------------------------------------------------------------- CLI
def _check_resume(folder: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to resume embeddings made otherwise (``run.json`` in the model's folder: model folder, its weights
    file's size and modification time, tasks, structure level, label schema); record the settings."""
    path = folder / "run.json"
    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and before != dict(settings):
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise RadFM3DInputError(folder, "holds embeddings made with other settings (" + ", ".join(
                f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items()) + "); give another --out")
    atomic_write_json(path, dict(settings))


#: the note on a model row whose tower comes from a generative model (fresh projections)
TOWER_ONLY_NOTE = ("a generative model's vision tower under untrained projections: zero-shot and retrieval are at "
                   "chance by construction; the linear probe reads the tower")


def _load_model(folder: str, device: str) -> tuple[Any, Any, bool]:
    """(model in eval mode, processor, tower_only). A CLIP folder loads as saved; a generative-model folder
    (``RadFM3DForCausalLM``: the demo model, a converted official RadFM) gives its vision tower and resampler under
    fresh projections and the MiniLM text tower, with the folder's preprocessing (``tower_only``)."""
    import torch

    from radfm3d.contrastive.configuration import is_clip_folder
    from radfm3d.contrastive.model import RadFM3DCLIPModel
    from radfm3d.contrastive.processing import RadFM3DCLIPProcessor
    from radfm3d.contrastive.transfer import load_vision_tower

    path = Path(folder)
    if not path.is_dir():
        raise RadFM3DInputError(folder, "--model: not a folder")
    if is_clip_folder(path) or not (path / "config.json").is_file():  # the latter: CLIP loading names the problem
        model = RadFM3DCLIPModel.from_pretrained(folder).to(device)
        return model, RadFM3DCLIPProcessor.from_pretrained(folder), False
    with torch.random.fork_rng(devices=[]):  # the fresh projections: the same for every run, the caller's RNG kept
        torch.manual_seed(0)
        model = RadFM3DCLIPModel.from_preset(folder)
    model = load_vision_tower(model, folder).eval().to(device)
    return model, RadFM3DCLIPProcessor.from_model_config(folder), True


def cli(argv: Iterable[str] | None = None) -> int:
    """`radfm3d evaluate-clip (--model DIR | --predictions [NAME=]embeddings.npz) ... --manifest test.jsonl --out DIR`.

    Exit status 0, or 1 when some records could not be embedded (listed in ``failures.json`` and the report)."""
    p = argparse.ArgumentParser(prog="radfm3d evaluate-clip", description=(
        "Score image-report embedding models: zero-shot AUROC, retrieval R@k, effective dimensionality, linear "
        "probe; one table row per model (a level ablation is one model per level)."))
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                   help="RadFM3DCLIPModel folder to run (repeatable); embeddings go to OUT/NAME/ and a rerun resumes. "
                        "A generative-model folder is scored by its vision tower under fresh projections (read its "
                        "linear probe)")
    p.add_argument("--predictions", action="append", default=[], metavar="[NAME=]FILE",
                   help="embeddings .npz of any model (repeatable; format in docs/contrastive.md); it may also hold "
                        "the --train-manifest records")
    p.add_argument("--train-predictions", action="append", default=[], metavar="[NAME=]FILE",
                   help="embeddings .npz of the training records for the --predictions model of that NAME")
    p.add_argument("--manifest", required=True, help="evaluated manifest (its report / study_report records)")
    p.add_argument("--train-manifest", help="training manifest: linear probe and the blind retrieval baseline")
    p.add_argument("--out", required=True, help="output folder (results.json, report.md, PNG plots)")
    p.add_argument("--label-schema", help="label_schema.json whose flags (else finding types) are the classes "
                                          "(default: the model's, else records' labels, else phantom_flags)")
    p.add_argument("--stratify-by", default=DEFAULT_STRATIFY_BY, metavar="KEY",
                   help="record key (e.g. region, modality) whose value is each record's stratum: the zero-shot and "
                        "probe AUROC are also reported counting only pairs of one stratum; 'none' switches it off "
                        "(default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(CLIP_TASKS), help="manifest tasks that are report records")
    p.add_argument("--limit", type=int, default=None, help="only the first N report records of each manifest")
    p.add_argument("--n-resamples", type=int, default=N_RESAMPLES)
    p.add_argument("--seed", type=int, default=BOOTSTRAP_SEED)
    p.add_argument("--batch-size", type=int, default=8, help="records embedded per forward pass")
    p.add_argument("--num-workers", type=int, default=2, help="threads reading and preprocessing scans")
    p.add_argument("--no-structures", action="store_true",
                   help="skip the structure level (report_structures sentences <-> regions)")
    p.add_argument("--device", default="cpu", help="torch device of --model runs (cpu, cuda, cuda:1, ...)")
    args = p.parse_args(list(argv) if argv is not None else None)
    if not args.model and not args.predictions:
        p.error("give at least one --model or --predictions")

    from radfm3d.evaluation.harness import prepare_output_dir

    out = prepare_output_dir(args.out)
    records = report_records(args.manifest, args.tasks, args.limit)
    train_records = report_records(args.train_manifest, args.tasks, args.limit) if args.train_manifest else None
    sources: dict[str, tuple[str, str]] = {}
    for kind, specs in (("model", args.model), ("predictions", args.predictions)):
        for spec in specs:
            name, path = _named(spec, f"--{kind}")
            name = name or (Path(path).name if kind == "model" else Path(path).stem)
            if name in sources:
                raise RadFM3DInputError(path, f"two models are named {name!r}; name them with NAME={path}")
            sources[name] = (kind, path)
    train_files: dict[str, str] = {}
    for spec in args.train_predictions:
        name, path = _named(spec, "--train-predictions")
        train_files[name or Path(path).stem] = path
    unknown = sorted(set(train_files) - {n for n, (k, _) in sources.items() if k == "predictions"})
    if unknown:
        raise RadFM3DInputError(args.train_predictions[0], f"--train-predictions names {unknown} match no "
                                                           "--predictions NAME")

    # every given file is read (and validated) before any model runs
    loaded = {name: E.load_embeddings(path) for name, (kind, path) in sources.items() if kind == "predictions"}
    loaded_train = {name: E.load_embeddings(path) for name, path in train_files.items()}
    models: dict[str, tuple[E.Embeddings, E.Embeddings | None]] = {}
    failures: list[dict[str, Any]] = []
    meta_models: dict[str, Any] = {}
    for name, (kind, path) in sources.items():
        schema, tower_only = args.label_schema, False
        if kind == "model":
            folder = out / E._safe(name)
            folder.mkdir(parents=True, exist_ok=True)
            if schema is None and _scorable_schema(Path(path) / "label_schema.json"):
                schema = Path(path) / "label_schema.json"
            schema = _default_schema(schema, records)
            weights = Path(path) / "model.safetensors"
            stamp = f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights.is_file() else None
            _check_resume(folder, {"model": str(Path(path).resolve()), "weights": stamp, "tasks": list(args.tasks),
                                   "structures": not args.no_structures,
                                   "label_schema": str(schema) if schema is not None else None})
            model, processor, tower_only = _load_model(path, args.device)
            own: list[dict[str, Any]] = []
            test_file = embed_manifest(model, processor, records, folder / "test_embeddings.npz",
                                       label_schema=schema, batch_size=args.batch_size,
                                       num_workers=args.num_workers,
                                       structures=not args.no_structures, failures=own,
                                       stratify_by=args.stratify_by)
            train_file = embed_manifest(model, processor, train_records, folder / "train_embeddings.npz",
                                        label_schema=schema, batch_size=args.batch_size,
                                        num_workers=args.num_workers, structures=False, failures=own,
                                        stratify_by=args.stratify_by) \
                if train_records else None
            failures += [{**f, "model": name} for f in own]
            test_emb, train_emb = E.load_embeddings(test_file), (E.load_embeddings(train_file) if train_file else None)
        else:
            schema = _default_schema(schema, records)
            test_emb, train_emb = loaded[name], loaded_train.get(name)
        test, info = resolve_labels(test_emb, records, schema, args.stratify_by)
        train = None
        if train_records is not None:
            source = train_emb if train_emb is not None else test_emb
            if set(str(r["id"]) for r in train_records) & set(source.record_ids.tolist()):
                train, tinfo = resolve_labels(source, train_records, schema, args.stratify_by)
                info["train_missing"] = len(tinfo["missing"])
            else:
                info["train_missing"] = len(train_records)
        meta_models[name] = {"kind": kind, "path": str(path), "label_schema": str(schema) if schema else None,
                             "tower_only": tower_only,
                             "missing_records": len(info["missing"]), "report_text_mismatch": info["text_mismatch"],
                             "label_conflicts": info["label_conflicts"], **({"train_missing": info["train_missing"]}
                                                                           if "train_missing" in info else {})}
        models[name] = (test, train)
    label_sources = sorted({str(m["label_schema"]) if m["label_schema"] else "the records' labels"
                            for m in meta_models.values()})
    results, curves = E.evaluate_models(models, n_resamples=args.n_resamples, seed=args.seed, meta={
        "manifest": str(args.manifest), "train_manifest": args.train_manifest, "label_source": ", ".join(label_sources),
        "sources": meta_models, "n_manifest_records": len(records),
        "stratify_by": None if is_unset(args.stratify_by) else args.stratify_by})
    for name, m in results["models"].items():
        src = meta_models[name]
        if src["tower_only"]:
            m["notes"].append(TOWER_ONLY_NOTE)
        if src["missing_records"]:
            m["notes"].append(f"{src['missing_records']} of {len(records)} manifest records have no embeddings")
        if src["report_text_mismatch"]:
            m["notes"].append(f"{src['report_text_mismatch']} report texts differ from the manifest's answers "
                              "(the manifest's are used)")
        if results["meta"]["stratify_by"] and models[name][0].strata is None:
            m["notes"].append(f"within-stratum AUROC: no evaluated record has {args.stratify_by!r} (--stratify-by)")
        if src["label_conflicts"]:
            m["notes"].append(f"{src['label_conflicts']} labels in the file disagree with the manifest's "
                              "(the manifest's are used)")
    results["failures"] = failures
    if failures:
        atomic_write_json(out / "failures.json", failures)
    elif (out / "failures.json").is_file():
        (out / "failures.json").unlink()
    paths = E.write_results(results, curves, out)
    print("\n".join(results["summary"]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if failures:
        print(f"{len(failures)} record(s) could not be embedded and were not scored (listed in "
              f"{out / 'failures.json'}):")
        for f in failures:
            print(f"  {f['model']} {f['id']}: {f['problem']}")
        return 1
    return 0


def _scorable_schema(path: Path) -> bool:
    """Whether a model folder's label schema names classes to score (flags or finding types)."""
    if not path.is_file():
        return False
    from radfm3d.findings.schema import load_schema

    schema = load_schema(path)
    return bool(schema.flags or schema.finding_types)


def _default_schema(schema: Any, records: Sequence[Mapping[str, Any]]) -> Any:
    """The schema to use: the given one; else None when records carry labels (``labels``);
    else the phantom flags schema."""
    if schema is not None:
        return schema
    if any(_given_labels(r) for r in records):
        return None
    from radfm3d.data.phantom_schemas import schema_path

    return schema_path(DEFAULT_SCHEMA)
