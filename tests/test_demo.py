# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations


def test_demo_example_scans_read_back(tmp_path):
    from radfm3d.demo import EXAMPLES, make_example_scans
    from radfm3d.io import load_image

    paths = make_example_scans(tmp_path)
    assert [p.name for p in paths] == [example[0] for example in EXAMPLES]
    formats = {load_image(p).meta["source_format"] for p in paths}
    assert formats == {"nifti", "dicom-series"}
    assert all((tmp_path / f"{p.name}.truth.json").is_file() for p in paths)


def test_shipped_demo_model_answers_modality_and_region_on_the_example_scans():
    """The trained demo model in the bundle (real SmolLM2 base) reads the example scans right: one NIfTI CT abdomen,
    one DICOM-series MR T1 chest, neither from the training split."""
    import json

    import torch

    from radfm3d.demo import BUNDLE, make_example_scans
    from radfm3d.modeling.model import RadFM3DForCausalLM
    from radfm3d.processing import RadFM3DProcessor

    model_dir = BUNDLE / "models" / "model"
    model = RadFM3DForCausalLM.from_pretrained(model_dir).eval()
    processor = RadFM3DProcessor.from_pretrained(model_dir)
    scans = make_example_scans()
    truths = [json.loads((p.parent / f"{p.name}.truth.json").read_text()) for p in scans]
    prompts = ["<image> Is this a CT or an MRI scan (and which weighting)?", "<image> Is this a scan of the head, chest or abdomen?"]
    texts = [p for p in prompts for _ in scans]
    inputs = processor(text=texts, images=[[str(s)] for _ in prompts for s in scans])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])
    expected_modality = ["CT." if t["modality"] == "CT" else f"MRI, {t['sequence']}-weighted." for t in truths]
    expected_region = [f"{t['region'].capitalize()}." for t in truths]
    assert [a.strip() for a in answers] == expected_modality + expected_region, answers
