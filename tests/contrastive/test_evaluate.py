# Copyright (c) radfm3d contributors. Apache-2.0.
"""`radfm3d evaluate-clip`: zero-shot classes and labels from schemas, records and ground truth; a tiny CLIP model
end to end on phantom records (embeddings equal to the model's own, resume from the per-record file, settings
guard, an unreadable scan); embeddings files of other models scored by the same code, one row per model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from radfm3d.contrastive import evaluate as CE
from radfm3d.data.phantom_schemas import schema_path
from radfm3d.errors import RadFM3DInputError
from radfm3d.evaluation.embeddings import load_embeddings, save_embeddings


def test_classes_and_labels_from_schema_records_and_ground_truth():
    names, phrases = CE.zero_shot_classes(schema_path("phantom_flags"))
    assert len(names) == 15 and names[0] == "brain_hemorrhage" and phrases[0] == "brain hemorrhage"
    records = [
        {"id": "a", "ground_truth": {"findings": [{"organ": "lung", "side": "left", "type": "nodule"},
                                                 {"organ": "liver", "side": "none", "type": "cyst"}]}},
        {"id": "b", "ground_truth": {"findings": []}},
        {"id": "c", "labels": {"lung_nodule": 1}},  # given labels win; classes it does not name stay unknown
        {"id": "d"},
    ]
    labels = CE.record_labels(records, names, schema_path("phantom_flags"))
    expected_a = np.zeros(15, np.int8)
    expected_a[[names.index("lung_nodule"), names.index("liver_cyst")]] = 1
    assert labels[0].tolist() == expected_a.tolist()
    assert labels[1].tolist() == [0] * 15
    assert labels[2, names.index("lung_nodule")] == 1 and (np.delete(labels[2], names.index("lung_nodule")) == -1).all()
    assert (labels[3] == -1).all()
    # a schema without flags: one class per finding type
    types, _ = CE.zero_shot_classes(schema_path("phantom"))
    assert "mass" in types and "cyst" in types
    by_type = CE.record_labels(records[:2], types, schema_path("phantom"))
    assert by_type[0, types.index("nodule")] == 1 and by_type[0, types.index("mass")] == 0
    # no schema: the records' own label keys
    assert CE.zero_shot_classes(None, [{"labels": {"x_y": 0}}, {"labels": {"z": 1, "x_y": 1}}]) == (
        ["x_y", "z"], ["x y", "z"])
    # CT-RATE's importer writes them as the record's labels
    ct_rate = [{"id": "v", "labels": {"Emphysema": 1, "Atelectasis": 0}}]
    assert CE.zero_shot_classes(None, ct_rate)[0] == ["Emphysema", "Atelectasis"]
    assert CE.record_labels(ct_rate, ["Atelectasis", "Emphysema", "Mosaic"]).tolist() == [[0, 1, -1]]
    assert CE._default_schema(None, ct_rate) is None
    assert CE._scorable_schema(schema_path("phantom_flags")) and not CE._scorable_schema(
        schema_path("phantom_structures"))
    present, absent = CE.class_prompts(["lung nodule"])
    assert "There is a lung nodule." in present[0] and "No lung nodule." in absent[0]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP model (tiny-preset vision tower, 1-layer random BERT on MiniLM's vocabulary) and its processor."""
    import torch

    from radfm3d.contrastive.configuration import RadFM3DCLIPConfig
    from radfm3d.contrastive.model import RadFM3DCLIPModel
    from radfm3d.contrastive.processing import RadFM3DCLIPProcessor

    torch.manual_seed(0)
    text = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}
    config = RadFM3DCLIPConfig.from_preset("tiny", projection_dim=16, text_config=text)
    out = tmp_path_factory.mktemp("clip") / "tiny_clip"
    RadFM3DCLIPModel(config).save_pretrained(out)
    RadFM3DCLIPProcessor.from_model_config("tiny").save_pretrained(out)
    return out


def test_tiny_model_end_to_end_resume_and_settings(structured_phantoms, tiny_clip_dir, tmp_path):
    import torch

    from radfm3d.contrastive.model import RadFM3DCLIPModel
    from radfm3d.contrastive.processing import RadFM3DCLIPProcessor

    manifest = structured_phantoms.parent / "train.jsonl"
    out = tmp_path / "eval"
    argv = ["--model", f"tiny={tiny_clip_dir}", "--manifest", str(manifest), "--train-manifest", str(manifest),
            "--out", str(out), "--n-resamples", "50"]
    assert CE.cli(argv) == 0
    results = json.loads((out / "results.json").read_text())
    records = CE.report_records(manifest)
    m = results["models"]["tiny"]
    assert m["n_records"] == len(records) >= 3
    assert m["retrieval"]["n_images"] == len(records)
    assert len(m["classes"]) == 15 and m["zero_shot"] is not None and m["probe"] is not None
    assert m["zero_shot"]["report_text"]["mean"]["n"] == len(records)
    assert "| tiny |" in (out / "report.md").read_text()
    for png in ("recall_at_k.png", "spectrum.png"):
        assert (out / png).stat().st_size > 1000

    emb = load_embeddings(out / "tiny" / "test_embeddings.npz")
    assert emb.record_ids.tolist() == [r["id"] for r in records]
    assert emb.report_texts.tolist() == [r["answer"] for r in records]
    # the stored embeddings are the model's own, computed here through the processor's __call__
    model = RadFM3DCLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = RadFM3DCLIPProcessor.from_pretrained(tiny_clip_dir)
    enc = processor(text=[records[0]["answer"]], images=[records[0]["images"][0]])
    with torch.inference_mode():
        image = model.get_image_features(enc["pixel_values"])[0].numpy()
        text = model.get_text_features(enc["input_ids"], enc["attention_mask"])[0].numpy()
    assert np.allclose(emb.image_embeds[0], image, atol=1e-5) and np.allclose(emb.text_embeds[0], text, atol=1e-5)
    assert emb.zero_shot_scores.shape == (len(records), 15) and np.isfinite(emb.zero_shot_scores).all()
    assert emb.strata.tolist() == [r["region"] for r in records]  # --stratify-by region (the default)
    assert results["meta"]["stratify_by"] == "region" and m["n_strata"] == len({r["region"] for r in records})
    assert set(m["zero_shot"]["stratified"]["per_class"]) == set(m["classes"])
    # the structure level: the rows the training collate builds, embedded as the model's encode_batch does
    from radfm3d.contrastive.data import ClipCollate

    batch = ClipCollate(processor.tokenizer, processor.recipe)([records[0]])
    with torch.inference_mode():
        regions, sentences = model.encode_batch(batch, level_weights={"scan": 0.0, "study": 0.0,
                                                                      "structure": 1.0})["structure"][:2]
    mine = emb.structure_series == f"{records[0]['id']}#0"
    assert int(mine.sum()) == regions.shape[0] > 0
    assert np.allclose(emb.structure_embeds[mine], regions.numpy(), atol=1e-4)
    assert np.allclose(emb.structure_text_embeds[mine], sentences.numpy(), atol=1e-4)
    assert m["structure"]["n_rows"] == len(emb.structure_series)
    assert m["structure"]["localisation"]["chance"] is not None
    # organ-level zero-shot: a class is scored on the regions of its organ, NaN where the record has none
    organ_scores = emb.structure_zero_shot_scores
    assert organ_scores.shape == (len(records), 15)
    classes = m["classes"]
    for i, record in enumerate(records):
        organs = {e["structure"].split("/")[0] for e in record.get("report_structures") or []}
        for k, name in enumerate(classes):
            assert np.isnan(organ_scores[i, k]) == (name.split("_")[0] not in organs), (record["id"], name)
    scored = ~np.isnan(organ_scores)
    assert m["zero_shot"]["structure"]["per_class"]  # AUROC over the scored records only
    for name, figure in m["zero_shot"]["structure"]["per_class"].items():
        assert figure["n"] == int(scored[:, classes.index(name)].sum())
    assert "zero-shot on structure regions" in (out / "report.md").read_text()

    # resume: a record the per-record file holds is not embedded again, a missing one is
    cache = out / "tiny" / "test_embeddings.jsonl"
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    rows[0]["image_embeds"] = [7.0] * len(rows[0]["image_embeds"])
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) + '{"id": "torn')  # last record lost
    assert CE.cli(argv) == 0
    again = load_embeddings(out / "tiny" / "test_embeddings.npz")
    assert np.all(again.image_embeds[0] == 7.0)
    assert np.allclose(again.image_embeds[-1], emb.image_embeds[-1], atol=1e-6)
    assert len(cache.read_text().splitlines()) == len(records)

    # other settings in the same folder are refused
    with pytest.raises(RadFM3DInputError, match="other settings"):
        CE.cli(argv + ["--label-schema", str(schema_path("phantom"))])


def test_study_record_gets_the_fused_study_embedding(structured_phantoms, tiny_clip_dir, tmp_path):
    import torch

    from radfm3d.contrastive.model import RadFM3DCLIPModel
    from radfm3d.contrastive.processing import RadFM3DCLIPProcessor

    singles = CE.report_records(structured_phantoms.parent / "train.jsonl")
    study = {"id": "study-0", "task": "study_report", "images": singles[0]["images"] + singles[1]["images"],
             "image_modalities": ["CT", "CT"], "prompt": "<image><image> Write the study report.",
             "answer": "A study report."}
    model = RadFM3DCLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = RadFM3DCLIPProcessor.from_pretrained(tiny_clip_dir)
    path = CE.embed_manifest(model, processor, [study, singles[2]], tmp_path / "emb.npz", progress=False)
    emb = load_embeddings(path)
    enc = processor(images=[study["images"]], modalities=[["CT", "CT"]])
    with torch.inference_mode():
        fused = model.get_image_features(enc["pixel_values"], enc["image_mask"])[0].numpy()
        first = model.get_image_features(enc["pixel_values"][:, 0])[0].numpy()
    assert np.allclose(emb.image_embeds[0], fused, atol=1e-5) and not np.allclose(fused, first, atol=1e-3)
    assert emb.record_ids.tolist() == ["study-0", singles[2]["id"]]


def test_batches_and_reader_threads_do_not_change_embeddings(structured_phantoms, tiny_clip_dir, tmp_path):
    from radfm3d.contrastive.model import RadFM3DCLIPModel
    from radfm3d.contrastive.processing import RadFM3DCLIPProcessor

    model = RadFM3DCLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = RadFM3DCLIPProcessor.from_pretrained(tiny_clip_dir)
    records = CE.report_records(structured_phantoms.parent / "train.jsonl")
    one = load_embeddings(CE.embed_manifest(model, processor, records, tmp_path / "a.npz", batch_size=1,
                                            num_workers=1, progress=False))
    many = load_embeddings(CE.embed_manifest(model, processor, records, tmp_path / "b.npz", batch_size=3,
                                             num_workers=3, progress=False))
    assert one.record_ids.tolist() == many.record_ids.tolist() == [r["id"] for r in records]
    assert np.allclose(one.image_embeds, many.image_embeds, atol=1e-5)
    assert np.allclose(one.text_embeds, many.text_embeds, atol=1e-5)
    # without a failures list the first unreadable scan raises, naming it
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    with pytest.raises(RadFM3DInputError, match="broken.nii.gz"):
        CE.embed_manifest(model, processor, [{**records[0], "images": [str(broken)]}], tmp_path / "c.npz",
                          progress=False)


def test_unreadable_scan_is_listed_and_the_rest_scored(structured_phantoms, tiny_clip_dir, tmp_path):
    src = structured_phantoms.parent
    records = [json.loads(line) for line in (src / "train.jsonl").read_text().splitlines()]
    records = [r for r in records if r["task"] == "report"]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    records[0]["images"] = [str(broken)]
    for r in records[1:]:
        r["images"] = [str(src / p) for p in r["images"]]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    assert CE.cli(["--model", str(tiny_clip_dir), "--manifest", str(manifest), "--out", str(out),
                   "--n-resamples", "20"]) == 1
    failures = json.loads((out / "failures.json").read_text())
    assert [f["id"] for f in failures] == [records[0]["id"]]
    assert json.loads((out / "results.json").read_text())["models"]["tiny_clip"]["n_records"] == len(records) - 1
    assert records[0]["id"] in (out / "report.md").read_text()


def test_strata_from_records_override_the_file_and_switch_off(tmp_path):
    records = [{"id": "a", "answer": "x", "region": "head", "modality": "CT"},
               {"id": "b", "answer": "y", "ground_truth": {"region": "chest"}, "modality": "MR"},
               {"id": "c", "answer": "z", "modality": "CT"}]
    assert CE.record_strata(records, "region").tolist() == ["head", "chest", "(no region)"]
    assert CE.record_strata(records, "modality").tolist() == ["CT", "MR", "CT"]
    assert CE.record_strata(records, "none") is None and CE.record_strata(records, "site") is None
    emb = load_embeddings(save_embeddings(tmp_path / "e.npz", record_ids=np.array(["c", "b", "a"]),
                                          image_embeds=np.eye(3), report_texts=np.array(["z", "y", "x"]),
                                          strata=np.array(["s3", "s2", "s1"])))
    assert CE.resolve_labels(emb, records, None, "modality")[0].strata.tolist() == ["CT", "MR", "CT"]
    assert CE.resolve_labels(emb, records, None, "site")[0].strata.tolist() == ["s1", "s2", "s3"]  # the file's
    assert CE.resolve_labels(emb, records, None, "none")[0].strata is None


def test_embeddings_files_of_other_models_one_row_each(structured_phantoms, tmp_path, capsys):
    from radfm3d.cli import main

    manifest = structured_phantoms.parent / "train.jsonl"
    records = CE.report_records(manifest)
    rng = np.random.default_rng(0)
    texts = [r["answer"] for r in records]
    text_embeds = rng.normal(size=(len(records), 8))
    ids = np.array([r["id"] for r in records])
    good = save_embeddings(tmp_path / "good.npz", record_ids=ids, image_embeds=text_embeds + 0.01,
                           report_texts=np.array(texts), text_embeds=text_embeds)
    partial = save_embeddings(tmp_path / "partial.npz", record_ids=ids[1:], image_embeds=rng.normal(size=(
        len(records) - 1, 8)), report_texts=np.array(texts[1:]), text_embeds=text_embeds[1:])
    out = tmp_path / "eval"
    assert main(["evaluate-clip", "--predictions", str(good), "--predictions", f"other={partial}",
                 "--manifest", str(manifest), "--out", str(out), "--n-resamples", "20"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["good", "other"]
    g = results["models"]["good"]
    assert g["retrieval"]["image_to_report"]["R@1"]["value"] == 1.0
    assert g["zero_shot"] is None and any("zero_shot_scores" in n for n in g["notes"])
    assert results["models"]["other"]["n_records"] == len(records) - 1
    assert any("1 of" in n for n in results["models"]["other"]["notes"])
    md = (out / "report.md").read_text()
    assert md.count("| good |") == 1 and md.count("| other |") == 1
    # a bad embeddings file: one line naming the file and the array, exit status 2
    bad = tmp_path / "bad.npz"
    with open(bad, "wb") as fh:
        np.savez(fh, record_ids=ids, image_embeds=np.zeros((len(ids), 3)), report_texts=np.array(texts),
                 text_embeds=np.zeros((len(ids), 4)))
    capsys.readouterr()
    assert main(["evaluate-clip", "--predictions", str(bad), "--manifest", str(manifest), "--out",
                 str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "'text_embeds'" in err and "Traceback" not in err
    shutil.rmtree(out)


def test_organ_level_zero_shot_takes_the_best_region_of_the_class_structure(tiny_clip_dir):
    import torch

    from radfm3d.contrastive.model import RadFM3DCLIPModel

    structures = CE.class_structures(schema_path("phantom_flags"), ["kidney_cyst", "liver_mass", "brain_cyst"])
    assert structures == [("kidney",), ("liver",), ("brain",)]
    assert CE.class_structures(None, ["a", "b"]) == [None, None]
    model = RadFM3DCLIPModel.from_pretrained(tiny_clip_dir).eval()
    rng = np.random.default_rng(0)
    p = model.config.projection_dim
    emb = rng.normal(size=(4, p)).astype(np.float32)
    rows = [[{"series": 0, "structure": "kidney/left", "image_embeds": emb[0].tolist()},
             {"series": 0, "structure": "kidney/left", "image_embeds": emb[3].tolist()},  # same region: first kept
             {"series": 1, "structure": "kidney/right", "image_embeds": emb[1].tolist()},
             {"series": 0, "structure": "liver", "image_embeds": emb[2].tolist()}],
            []]
    prompts = (rng.normal(size=(3, p)).astype(np.float32), rng.normal(size=(3, p)).astype(np.float32))
    scores = CE.structure_zero_shot_scores(model, rows, structures, prompts)
    with torch.inference_mode():
        logits = model.zero_shot_logits(torch.as_tensor(emb), *(torch.as_tensor(x) for x in prompts)).numpy()
    assert scores.shape == (2, 3)
    assert np.isclose(scores[0, 0], max(logits[0, 0], logits[1, 0]), atol=1e-5)  # best of the two kidneys
    assert np.isclose(scores[0, 1], logits[2, 1], atol=1e-5)
    assert np.isnan(scores[0, 2]) and np.isnan(scores[1]).all()


def test_a_generative_model_folder_is_scored_by_its_tower(structured_phantoms, tmp_path):
    """`--model` on a RadFM3DForCausalLM folder: its vision tower under fresh projections, flagged in the notes."""
    import torch

    from radfm3d.contrastive.training import build_clip_model, load_clip_processor
    from radfm3d.modeling import RadFM3DConfig, RadFM3DForCausalLM

    torch.manual_seed(3)
    lm = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).eval()
    lm.config.text_model_name_or_path = "smollm2-135m-instruct"  # its LLM, which is no text tower for CLIP
    lm.save_pretrained(tmp_path / "lm")
    # a generative model folder carries its preprocessing (here the tiny preset's input grid)
    load_clip_processor("tiny").recipe.save(tmp_path / "lm")
    manifest = structured_phantoms.parent / "train.jsonl"
    out = tmp_path / "eval"
    assert CE.cli(["--model", f"lm={tmp_path / 'lm'}", "--manifest", str(manifest), "--train-manifest",
                   str(manifest), "--out", str(out), "--n-resamples", "20", "--no-structures"]) == 0
    results = json.loads((out / "results.json").read_text())
    m = results["models"]["lm"]
    assert CE.TOWER_ONLY_NOTE in m["notes"] and m["probe"] is not None
    assert results["meta"]["sources"]["lm"]["tower_only"] is True
    # the image embeddings are the generative tower's pooled latents, projected
    records = CE.report_records(manifest)
    clip = build_clip_model(tmp_path / "lm", seed=0, vision_tower=tmp_path / "lm").eval()
    processor = load_clip_processor(tmp_path / "lm")
    enc = processor(text=["x"], images=[records[0]["images"][0]])
    with torch.inference_mode():
        want = clip.visual_projection(lm.get_visual_latents(enc["pixel_values"]).mean(dim=1))[0].numpy()
    emb = load_embeddings(out / "lm" / "test_embeddings.npz")
    assert np.allclose(emb.image_embeds[0], want, atol=1e-5)
