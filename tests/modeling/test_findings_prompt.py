# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radfm3d.data.phantoms import FINDING_TYPES
from radfm3d.data.structured_labels import STRUCTURES
from radfm3d.modeling.configuration import RadFM3DConfig
from radfm3d.modeling.findings_prompt import FindingsPrompter, build_findings_prompt_config
from radfm3d.modeling.heads import BOX, N_COUNT, VisionPretrainingModel
from radfm3d.modeling.model import RadFM3DForCausalLM
from radfm3d.processing import RadFM3DProcessor

HIDDEN = 16


@pytest.fixture(scope="module")
def tiny() -> tuple[RadFM3DForCausalLM, RadFM3DProcessor]:
    torch.manual_seed(0)
    model = RadFM3DForCausalLM(RadFM3DConfig.from_preset("tiny")).eval()
    return model, RadFM3DProcessor.from_model_config("tiny")


def _spec(processor: RadFM3DProcessor, num_tokens: int = 160, threshold: float = 0.5) -> dict:
    # the tiny preset's tokenizer is one token per character, so a full reading needs ~100 slots
    return build_findings_prompt_config(processor.tokenizer, num_tokens=num_tokens, threshold=threshold,
                                        head_hidden=HIDDEN)


def _rigged_heads(model: RadFM3DForCausalLM, modality: int, region: int, finding_type: int | None) -> dict:
    """Head weights whose outputs ignore the image: the given modality/region, every structure box the whole grid,
    and every patch holding ``finding_type`` (None: no patch holds a finding)."""
    wrapper = VisionPretrainingModel(model, hidden=HIDDEN)
    last, patch = wrapper.head.net[-1], wrapper.patch_head
    n_types, n_struct = len(FINDING_TYPES), len(STRUCTURES)
    with torch.no_grad():
        last.weight.zero_(), patch.weight.zero_()
        bias = torch.zeros_like(last.bias)
        bias[modality] = bias[3 + region] = 10.0
        per = wrapper.head.per_structure
        for s in range(n_struct):
            start = 3 + 3 + N_COUNT + s * per + 1  # structure box after the presence logit
            bias[start:start + 3], bias[start + 3:start + BOX] = -10.0, 10.0
        last.bias.copy_(bias)
        pbias = torch.full((1 + n_types,), -10.0)
        if finding_type is not None:
            pbias[0], pbias[1 + finding_type] = 10.0, 10.0
        patch.bias.copy_(pbias)
    state = {f"head.{k}": v for k, v in wrapper.head.state_dict().items()}
    state.update({f"patch_head.{k}": v for k, v in wrapper.patch_head.state_dict().items()})
    return state


def _with_prompt(model: RadFM3DForCausalLM, processor: RadFM3DProcessor, heads: dict, **spec_kwargs
                 ) -> tuple[RadFM3DForCausalLM, RadFM3DProcessor]:
    clone = RadFM3DForCausalLM(RadFM3DConfig.from_dict(model.config.to_dict()))
    clone.load_state_dict(model.state_dict())
    clone.add_findings_prompt(_spec(processor, **spec_kwargs), heads)
    proc = RadFM3DProcessor.from_model_config("tiny")
    proc.num_image_tokens = clone.tokens_per_image
    proc.check_config(clone.config)
    return clone.eval(), proc


@pytest.mark.parametrize(("modality", "region", "finding_type", "expected"), [
    (1, 2, FINDING_TYPES.index("cyst"),
     "Image reading: MRI T1-weighted, abdomen; liver cyst, spleen cyst, right kidney cyst, left kidney cyst."),
    (0, 1, FINDING_TYPES.index("nodule"), "Image reading: CT, chest; right lung nodule, left lung nodule."),
    (2, 0, None, "Image reading: MRI T2-weighted, head; no findings."),
])
def test_reading_text_and_token_ids(modality, region, finding_type, expected, tiny):
    model, processor = tiny
    prompted, proc = _with_prompt(model, processor, _rigged_heads(model, modality, region, finding_type))
    pixels = torch.rand(2, 1, model.config.vision.in_channels, 32, 32, 8)
    readings = prompted.read_findings(pixels)
    assert [[r["text"] for r in row] for row in readings] == [[expected], [expected]]
    assert all(f["score"] > 0.5 for f in readings[0][0]["findings"])
    prompter = prompted.findings_prompter
    latents, tokens, grid = prompted.get_visual_latents(pixels[:, 0], return_patch_tokens=True)
    ids = prompter.token_ids(prompter.read(latents, tokens, grid))
    assert ids.shape == (2, prompter.num_tokens)
    assert proc.tokenizer.decode(ids[0].tolist()).strip() == expected  # filler is blank


def test_long_reading_drops_findings_to_fit(tiny):
    model, processor = tiny
    heads = _rigged_heads(model, 1, 2, FINDING_TYPES.index("cyst"))
    prompted, _ = _with_prompt(model, processor, heads, num_tokens=70)
    pixels = torch.rand(1, 1, model.config.vision.in_channels, 32, 32, 8)
    text = prompted.read_findings(pixels)[0][0]["text"]
    prompter = prompted.findings_prompter
    latents, tokens, grid = prompted.get_visual_latents(pixels[:, 0], return_patch_tokens=True)
    ids = prompter.token_ids(prompter.read(latents, tokens, grid))
    kept = processor.tokenizer.decode(ids[0].tolist()).strip()
    assert ids.shape == (1, 70) and kept.endswith("cyst.") and len(kept) <= 70
    assert text.startswith(kept[:-1]) and len(kept) < len(text)  # cut at a finding boundary, period kept


def test_model_with_findings_prompt_runs_saves_and_loads(tiny, tmp_path: Path):
    model, processor = tiny
    prompted, proc = _with_prompt(model, processor, _rigged_heads(model, 0, 2, FINDING_TYPES.index("mass")))
    assert prompted.tokens_per_image == model.config.num_image_tokens + 160
    volume = torch.rand(32, 32, 8) * 1000 - 500
    batch = proc(text=["<image> Report?"], images=[[volume]])
    assert int((batch["input_ids"] == prompted.config.image_token_id).sum()) == prompted.tokens_per_image
    with torch.no_grad():
        logits = prompted(**batch).logits
    out = prompted.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    # the reading changes what the LLM sees: different heads, different logits
    other, _ = _with_prompt(model, processor, _rigged_heads(model, 0, 2, None))
    with torch.no_grad():
        assert not torch.allclose(other(**batch).logits, logits)
    prompted.save_pretrained(tmp_path)
    again = RadFM3DForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.findings_prompt == prompted.config.findings_prompt
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, logits, atol=1e-5)
    # a processor that forgets the reading slots is refused with the counts named
    with pytest.raises(ValueError, match="placeholder"):
        again(**processor(text=["<image> Report?"], images=[[volume]]))


def test_prompter_is_frozen_and_reads_without_images(tiny):
    model, processor = tiny
    prompted, _ = _with_prompt(model, processor, _rigged_heads(model, 0, 1, None))
    assert not any(p.requires_grad for p in prompted.findings_prompter.parameters())
    pixels = torch.rand(2, 2, model.config.vision.in_channels, 32, 32, 8)
    readings = prompted.read_findings(pixels, torch.tensor([[True, False], [False, False]]))
    assert len(readings[0]) == 1 and readings[1] == []
    assert model.read_findings(pixels) == [[], []]  # no findings prompt: nothing to read
    assert isinstance(prompted.findings_prompter, FindingsPrompter)


def test_attach_cli_writes_a_loadable_folder(tiny, tmp_path: Path):
    from radfm3d.engine.pretraining import attach_findings_prompt
    from radfm3d.errors import RadFM3DInputError

    model, processor = tiny
    wrapper = VisionPretrainingModel(model)  # default head width, as the stage-0 bundle writes it
    src = tmp_path / "stage0"
    wrapper.save_pretrained(src)
    processor.save_pretrained(src)
    with pytest.raises(RadFM3DInputError, match="no vision pre-training heads"):
        attach_findings_prompt(src, tmp_path / "x", heads_dir=tmp_path)
    out = attach_findings_prompt(src, tmp_path / "with_prompt", num_tokens=120, threshold=0.7)
    again = RadFM3DForCausalLM.from_pretrained(out)
    proc = RadFM3DProcessor.from_pretrained(out)
    assert again.config.findings_prompt["threshold"] == 0.7 and proc.num_image_tokens == again.tokens_per_image
    with torch.no_grad():
        volume = torch.rand(32, 32, 8)
        assert again(**proc(text=["<image> Which modality?"], images=[[volume]])).logits.ndim == 3


def test_phantom_schema_rebuilds_the_shipped_spec():
    """The public label schema yields exactly the findings prompt stored in the shipped model's config.json."""
    import json

    from transformers import PreTrainedTokenizerFast

    model_dir = Path(__file__).resolve().parents[2] / "bundles" / "radfm3d_demo" / "models" / "model"
    shipped = json.loads((model_dir / "config.json").read_text())["findings_prompt"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    spec = build_findings_prompt_config(tokenizer, shipped["num_tokens"], shipped["threshold"], shipped["head_hidden"],
                                        site_scores=shipped.get("site_scores", "patch_map"),
                                        test_time_shifts=shipped.get("test_time_shifts"),
                                        snap_boxes=bool(shipped.get("snap_boxes")))
    if "site_scores" not in shipped:  # written before the key existed: the prompter reads it as "patch_map"
        del spec["site_scores"]
    assert json.loads(json.dumps(spec)) == shipped


def test_custom_label_schema(tiny):
    from radfm3d.data.structured_labels import LabelSchema

    schema = LabelSchema(modality_names=("CT", "MR"), regions=("knee",), structures=("femur", "meniscus"),
                         structure_names={"femur": "distal femur", "meniscus": "medial meniscus"},
                         finding_types=("tear", "fracture"),
                         finding_sites={"knee": (("meniscus", ("tear",)), ("femur", ("fracture",)))})
    spec = build_findings_prompt_config(tiny[1].tokenizer, num_tokens=120, head_hidden=HIDDEN, schema=schema)
    assert spec["structures"] == ["femur", "meniscus"] and spec["regions"] == ["knee"]
    assert spec["region_sites"] == [[[1, [0]], [0, [1]]]]
    assert spec["phrases"]["structure:1"] == " medial meniscus" and spec["phrases"]["type:1"] == " fracture"
    prompter = FindingsPrompter(spec, tiny[0].config.vision.hidden_size, tiny[0].num_image_tokens)
    assert prompter.patch_head.out_features == 1 + 2
    # the heads follow the schema's sizes: 2 modalities, 1 region, 2 structures x 2 types
    model = tiny[0]
    latents = torch.randn(1, model.num_image_tokens, model.config.vision.hidden_size)
    out = prompter.head(latents)
    assert out["modality"].shape == (1, 2) and out["region"].shape == (1, 1) and out["finding_type"].shape == (1, 2, 2)
    # stage 0 builds the same heads from the schema, so its trained heads load into the prompter unchanged
    wrapper = VisionPretrainingModel(model, hidden=HIDDEN, schema=schema)
    heads = {k: v for k, v in wrapper.state_dict().items() if k.startswith(("head.", "patch_head."))}
    prompter.load_state_dict(heads, strict=True)


@pytest.mark.parametrize("change, match", [
    ({"regions": ()}, "regions"),
    ({"structures": ("femur", "femur")}, "structures"),
    ({"finding_sites": {"hip": ()}}, "one entry per region"),
    ({"finding_sites": {"knee": (("tibia", ("tear",)),)}}, "not one of the structures"),
    ({"finding_sites": {"knee": (("femur", ("bruise",)),)}}, "finding types"),
    ({"structure_names": {"femur": "femur"}}, "lacks"),
])
def test_label_schema_rejects_inconsistent_tables(change, match):
    from radfm3d.data.structured_labels import LabelSchema

    fields = dict(modality_names=("CT",), regions=("knee",), structures=("femur", "meniscus"),
                  structure_names={"femur": "femur", "meniscus": "meniscus"}, finding_types=("tear",),
                  finding_sites={"knee": (("meniscus", ("tear",)),)})
    with pytest.raises(ValueError, match=match):
        LabelSchema(**{**fields, **change})


def test_detector_replaces_the_patch_head_as_the_finding_map(tiny):
    """With a detector in the spec, its cells (on its own grid) decide the findings; the patch head is not read."""
    from radfm3d.modeling.detector import detector_config

    model, processor = tiny
    heads = _rigged_heads(model, 0, 1, None)  # the patch head says: no finding anywhere
    spec = _spec(processor)
    spec["detector"] = detector_config({"channels": [2, 2, 2, 2]}, model.config.vision.in_channels, len(FINDING_TYPES))
    prompter = FindingsPrompter(spec, model.config.vision.hidden_size, model.num_image_tokens)
    state = dict(heads)
    for k, v in prompter.detector.state_dict().items():
        state[f"detector.{k}"] = v
    bias = torch.full((1 + len(FINDING_TYPES),), -10.0)
    bias[0] = bias[1 + FINDING_TYPES.index("nodule")] = 10.0
    state["detector.classifier.weight"] = torch.zeros_like(state["detector.classifier.weight"])
    state["detector.classifier.bias"] = bias
    clone = RadFM3DForCausalLM(RadFM3DConfig.from_dict(model.config.to_dict()))
    clone.load_state_dict(model.state_dict())
    clone.add_findings_prompt(spec, state)
    pixels = torch.rand(1, 1, model.config.vision.in_channels, 32, 32, 8)
    assert clone.read_findings(pixels)[0][0]["text"] == \
        "Image reading: CT, chest; right lung nodule, left lung nodule."
    without, _ = _with_prompt(model, processor, heads)
    assert without.read_findings(pixels)[0][0]["text"] == "Image reading: CT, chest; no findings."


def test_site_scores_from_the_latent_head(tiny):
    """``site_scores: "head"``: each site's score is the head's own presence x type; the patch map is not read."""
    model, processor = tiny
    heads = _rigged_heads(model, 0, 2, None)  # abdomen; the patch map says: no finding anywhere
    per, liver = VisionPretrainingModel(model, hidden=HIDDEN).head.per_structure, STRUCTURES.index("liver")
    bias = heads["head.net.4.bias"].clone()
    start = 3 + 3 + N_COUNT + liver * per
    bias[start + 1 + BOX] = 10.0  # finding_present of the liver
    bias[start + 2 + BOX + N_COUNT + FINDING_TYPES.index("cyst")] = 10.0  # its type
    for s in range(len(STRUCTURES)):  # every other structure: no finding
        if s != liver:
            bias[3 + 3 + N_COUNT + s * per + 1 + BOX] = -10.0
    heads["head.net.4.bias"] = bias
    patch_map, _ = _with_prompt(model, processor, heads)
    pixels = torch.rand(1, 1, model.config.vision.in_channels, 32, 32, 8)
    assert patch_map.read_findings(pixels)[0][0]["text"] == "Image reading: CT, abdomen; no findings."
    spec = {**_spec(processor), "site_scores": "head"}
    clone = RadFM3DForCausalLM(RadFM3DConfig.from_dict(model.config.to_dict()))
    clone.load_state_dict(model.state_dict())
    clone.add_findings_prompt(spec, heads)
    assert clone.read_findings(pixels)[0][0]["text"] == "Image reading: CT, abdomen; liver cyst."
    with pytest.raises(ValueError, match="site_scores 'everywhere'"):
        FindingsPrompter({**spec, "site_scores": "everywhere"}, model.config.vision.hidden_size, model.num_image_tokens)
    from radfm3d.modeling.detector import detector_config

    with pytest.raises(ValueError, match="detector is unused"):
        FindingsPrompter({**spec, "detector": detector_config(True, 3, 5)}, model.config.vision.hidden_size,
                         model.num_image_tokens)


@pytest.mark.parametrize(("text", "expected"), [
    (None, []), ("", []), ("none", []), ("2,2,0", [[2, 2, 0]]), ("2,2,0;-2,-2,0", [[2, 2, 0], [-2, -2, 0]]),
    ([[1, 0, -1]], [[1, 0, -1]]), (" 1, 2 ,3 ; ", [[1, 2, 3]]),
])
def test_parse_shifts(text, expected):
    from radfm3d.modeling.findings_prompt import parse_shifts

    assert parse_shifts(text) == expected


@pytest.mark.parametrize("bad", ["2,2", "a,b,c", "1.5,0,0", [[1, 2]], [3]])
def test_parse_shifts_refuses_what_is_not_three_whole_numbers(bad):
    from radfm3d.modeling.findings_prompt import parse_shifts

    with pytest.raises(ValueError, match="three whole voxel counts"):
        parse_shifts(bad)


@pytest.mark.parametrize("shift", [(0, 0, 0), (2, 0, 0), (0, -3, 1), (-1, 2, -2)])
def test_shifted_volume_moves_voxels_and_fills_the_border_with_zeros(shift):
    from radfm3d.modeling.findings_prompt import shifted_volume

    volume = torch.rand(2, 3, 8, 9, 6) + 1.0
    moved = shifted_volume(volume, shift)
    assert moved.shape == volume.shape
    dh, dw, dd = shift
    for h, w, d in [(4, 4, 2), (3, 5, 3), (5, 4, 2)]:
        assert torch.equal(moved[..., h + dh, w + dw, d + dd], volume[..., h, w, d])
    assert int((moved == 0).sum()) == 2 * 3 * (8 * 9 * 6 - (8 - abs(dh)) * (9 - abs(dw)) * (6 - abs(dd)))


def test_test_time_shifts_average_the_head_site_scores_over_shifted_scans(tiny):
    """With ``test_time_shifts`` the model reads the scan and its shifted copies (one more encoder pass each) and
    each site's score is the mean of the head's presence x type over them; modality / region from the scan itself."""
    from radfm3d.modeling.findings_prompt import shifted_volume

    model, processor = tiny
    torch.manual_seed(1)
    heads = {k: v + 0.3 * torch.randn_like(v) if k.startswith("head.") else v
             for k, v in _rigged_heads(model, 0, 2, None).items()}  # image-dependent scores
    shifts = [[1, 1, 0], [-2, 0, 1]]
    spec = {**_spec(processor), "site_scores": "head", "test_time_shifts": shifts}
    clone = RadFM3DForCausalLM(RadFM3DConfig.from_dict(model.config.to_dict()))
    clone.load_state_dict(model.state_dict())
    clone.add_findings_prompt(spec, heads)
    clone.eval()
    pixels = torch.rand(1, 1, model.config.vision.in_channels, 32, 32, 8)
    found = {f["structure"]: f["score"] for f in clone.read_findings(pixels, threshold=-1.0)[0][0]["findings"]}
    prompter, image = clone.findings_prompter, pixels[:, 0]
    outs = [prompter.head(clone.get_visual_latents(v).float())
            for v in [image, *(shifted_volume(image, s) for s in shifts)]]
    joint = torch.stack([torch.sigmoid(o["finding_present"])[..., None] * o["finding_type"].softmax(-1)
                         for o in outs]).mean(0)[0]
    assert found and all(score == pytest.approx(float(joint[STRUCTURES.index(s)].max()), abs=1e-4)
                         for s, score in found.items())
    single = {f["structure"]: f["score"] for f in
              prompter.describe(prompter.read(*clone.get_visual_latents(image, return_patch_tokens=True),
                                              threshold=-1.0)[0])["findings"]}
    assert single != found  # the shifts changed the scores
    with pytest.raises(ValueError, match="need site_scores 'head'"):
        FindingsPrompter({**spec, "site_scores": "patch_map"}, model.config.vision.hidden_size, model.num_image_tokens)
    with pytest.raises(ValueError, match="need site_scores 'head'"):
        build_findings_prompt_config(processor.tokenizer, num_tokens=160, test_time_shifts="1,1,0")
    assert build_findings_prompt_config(processor.tokenizer, num_tokens=160, site_scores="head",
                                        test_time_shifts="1,1,0")["test_time_shifts"] == [[1, 1, 0]]


def test_attach_sets_and_removes_test_time_shifts(tiny, tmp_path: Path):
    from radfm3d.engine.pretraining import attach_findings_prompt
    from radfm3d.errors import RadFM3DInputError

    model, processor = tiny
    clone, proc = _with_prompt(model, processor, _rigged_heads(model, 0, 2, None))
    base = tmp_path / "base"
    clone.save_pretrained(base)
    proc.save_pretrained(base)
    with pytest.raises(RadFM3DInputError, match="need site_scores 'head'"):
        attach_findings_prompt(base, tmp_path / "x", replace=True, test_time_shifts="1,1,0")
    with pytest.raises(RadFM3DInputError, match="three whole voxel counts"):
        attach_findings_prompt(base, tmp_path / "x", replace=True, site_scores="head", test_time_shifts="1,1")
    shifted = attach_findings_prompt(base, tmp_path / "shifted", replace=True, site_scores="head",
                                     test_time_shifts="1,1,0;-1,-1,0")
    spec = RadFM3DForCausalLM.from_pretrained(shifted, load_text_weights=False).config.findings_prompt
    assert spec["test_time_shifts"] == [[1, 1, 0], [-1, -1, 0]]
    kept = attach_findings_prompt(shifted, tmp_path / "kept", replace=True, threshold=0.3)  # other changes keep them
    assert RadFM3DForCausalLM.from_pretrained(kept, load_text_weights=False).config.findings_prompt[
        "test_time_shifts"] == [[1, 1, 0], [-1, -1, 0]]
    removed = attach_findings_prompt(shifted, tmp_path / "removed", replace=True, test_time_shifts="none")
    assert "test_time_shifts" not in RadFM3DForCausalLM.from_pretrained(
        removed, load_text_weights=False).config.findings_prompt
