# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadFM3DCLIPModel: shapes, levels of encode_batch, pooling, zero-shot logits, save/load, load errors, training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from radfm3d.contrastive import (TINY_TEXT_CONFIG, MultiLevelContrastiveLoss, RadFM3DCLIPConfig, RadFM3DCLIPModel,
                                 contrastive_loss, group_ids)
from radfm3d.contrastive.model import SetPooling, box_patch_mask
from radfm3d.errors import RadFM3DInputError

GRID = (32, 32, 8)  # the tiny preset: 8x8x4 patches -> 4x4x2 = 32 patch tokens


def tiny_model(**overrides) -> RadFM3DCLIPModel:
    torch.manual_seed(0)
    overrides.setdefault("projection_dim", 16)
    return RadFM3DCLIPModel.from_pretrained("tiny", load_text_weights=False, text_config=TINY_TEXT_CONFIG,
                                            **overrides)


@pytest.fixture(scope="module")
def model() -> RadFM3DCLIPModel:
    return tiny_model()


def make_batch(series_per_item=(2, 1, 3), structures=((0, 1, (0, 0, 0, 16, 16, 4)), (2, 0, (3, 3, 3, 4, 4, 4))),
               reports=("Nodule in the right lung.", "No abnormality.", "No  abnormality."), seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s = len(series_per_item), max(series_per_item)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i, n in enumerate(series_per_item):
        mask[i, :n] = True
    pixel_values = torch.rand(b, s, 3, *GRID, generator=g) * mask[:, :, None, None, None, None]
    ids = torch.randint(1000, 3000, (b, 7), generator=g)
    sentences = [f"sentence {k}" for k in range(len(structures))]
    return {
        "pixel_values": pixel_values, "image_mask": mask,
        "report_input_ids": ids, "report_attention_mask": torch.ones_like(ids), "report_group": group_ids(reports),
        "structure_index": torch.tensor([[i, j] for i, j, _ in structures], dtype=torch.long).reshape(-1, 2),
        "structure_boxes": torch.tensor([box for _, _, box in structures], dtype=torch.float32).reshape(-1, 6),
        "structure_input_ids": torch.randint(1000, 3000, (len(structures), 5), generator=g),
        "structure_attention_mask": torch.ones(len(structures), 5, dtype=torch.long),
        "structure_group": group_ids(sentences),
        "ids": [f"case{i}" for i in range(b)],
    }


# --------------------------------------------------------------------------------------------- CLIP API
@pytest.mark.parametrize("b,t", [(1, 1), (3, 2)])
def test_feature_and_forward_shapes(model, b, t):
    pixel_values = torch.rand(b, 3, *GRID)
    ids = torch.randint(1000, 3000, (t, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        image = model.get_image_features(pixel_values)
        text = model.get_text_features(ids, mask)
        out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask)
    assert image.shape == (b, 16) and text.shape == (t, 16)
    assert out.logits_per_image.shape == (b, t) and torch.equal(out.logits_per_text, out.logits_per_image.T)
    assert torch.allclose(out.image_embeds, F.normalize(image, dim=-1), atol=1e-6)
    scale = model.logit_scale.exp()
    assert torch.allclose(out.logits_per_image, scale * out.image_embeds @ out.text_embeds.T, atol=1e-5)
    assert out.loss is None


def test_forward_takes_the_processors_output(model):
    from radfm3d.contrastive import RadFM3DCLIPProcessor

    processor = RadFM3DCLIPProcessor.from_pretrained("tiny")
    enc = processor(text=["No abnormality.", "Nodule."], images=[torch.rand(3, *GRID)] * 3,
                    images_are_preprocessed=True)
    with torch.no_grad():
        out = model(**enc)
    assert out.logits_per_image.shape == (3, 2)
    with pytest.raises(TypeError, match="pixel_mask"):
        model(**enc, pixel_mask=None)


def test_a_volume_off_the_patch_grid_is_named(model):
    with pytest.raises(RadFM3DInputError, match="not divisible by patch size"):
        model.get_image_features(torch.rand(1, 3, 30, 32, 8))


def test_text_features_ignore_padding(model):
    ids = torch.randint(1000, 3000, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model.get_text_features(ids), model.get_text_features(padded, mask), atol=1e-5)


def test_forward_loss_uses_groups(model):
    pixel_values, ids = torch.rand(2, 3, *GRID), torch.randint(1000, 3000, (2, 6))
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=ids, return_loss=True)
        ref = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), torch.arange(2),
                               torch.arange(2))
        assert float(out.loss) == pytest.approx(float(ref), rel=1e-6)
        with pytest.raises(RadFM3DInputError, match="image_group"):
            model(pixel_values=pixel_values, input_ids=ids[:1], return_loss=True)
        grouped = model(pixel_values=pixel_values, input_ids=ids[:1], return_loss=True,
                        image_group=torch.tensor([0, 0]), text_group=torch.tensor([0]))
        assert torch.isfinite(grouped.loss)


def test_study_features_fuse_present_series_only(model):
    pixel_values = torch.rand(2, 3, 3, *GRID)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        study = model.get_image_features(pixel_values, mask)
        garbage = pixel_values.clone()
        garbage[~mask] = 7.0  # absent slots never reach the encoder
        assert torch.allclose(study, model.get_image_features(garbage, mask), atol=1e-6)
        # a one-series study embeds exactly as that scan; at initialisation attention fusion is the mean
        assert torch.allclose(study[1], model.get_image_features(pixel_values[1:2, 0])[0], atol=1e-5)
        pooled = model.encode_series(pixel_values[0, :2])[0]
        assert torch.allclose(study[0], model.visual_projection(pooled.mean(0)), atol=1e-5)


def test_zero_shot_logits_are_scaled_cosine_differences(model):
    image = F.normalize(torch.randn(4, 16), dim=-1)
    present, absent = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        got = model.zero_shot_logits(image, present, absent)
        positive = float(model.zero_shot_logits(present[:1], present[:1], absent[:1]))
    want = torch.stack([torch.stack([model.logit_scale.exp() * (F.cosine_similarity(i, p, dim=0)
                                                               - F.cosine_similarity(i, a, dim=0))
                                     for p, a in zip(present, absent)]) for i in image])
    assert got.shape == (4, 3) and torch.allclose(got, want.detach(), atol=1e-4)
    assert positive > 0
    with pytest.raises(RadFM3DInputError):
        model.zero_shot_logits(image, present, absent[:2])


# --------------------------------------------------------------------------------------------- levels
def test_encode_batch_levels_shapes_and_groups(model):
    batch = make_batch()
    with torch.no_grad():
        levels = model.encode_batch(batch)
    assert list(levels) == ["scan", "structure", "study"]
    scan_images, scan_texts, scan_image_group, scan_text_group = levels["scan"]
    assert scan_images.shape == (6, 16) and scan_texts.shape == (3, 16)
    # series take their item's report group; items 1 and 2 share a report ("no abnormality.")
    report = batch["report_group"]
    assert scan_image_group.tolist() == [report[0]] * 2 + [report[1]] + [report[2]] * 3
    assert report[1] == report[2] and torch.equal(scan_text_group, report)
    study_images, study_texts, study_group, study_text_group = levels["study"]
    assert study_images.shape == (2, 16) and study_group.tolist() == [report[0], report[2]]
    assert torch.equal(study_texts, scan_texts) and torch.equal(study_text_group, report)  # all reports as candidates
    structure_images, structure_texts, structure_group, _ = levels["structure"]
    assert structure_images.shape == (2, 16) and structure_texts.shape == (2, 16)
    assert torch.equal(structure_group, batch["structure_group"])
    for images, texts, _, _ in levels.values():
        assert torch.allclose(images.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
        assert torch.allclose(texts.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    assert float(levels.logit_scale) == pytest.approx(float(model.logit_scale.exp()))


ONE_BOX = ((0, 0, (0, 0, 0, 8, 8, 4)),)


@pytest.mark.parametrize("series,structures,weights,expected", [
    ((1, 1, 1), ONE_BOX, None, ["scan", "structure"]),                    # no item with >= 2 series: no study
    ((2, 1), (), None, ["scan", "study"]),                                 # R = 0: no structure level
    ((2, 1), ONE_BOX, {"scan": 0.0, "structure": 1.0, "study": 1.0}, ["structure", "study"]),
    ((2, 1), ONE_BOX, {"scan": 1.0, "structure": 0.0, "study": 0.0}, ["scan"]),
    ((2, 1), ONE_BOX, {"scan": 0.0, "structure": 0.0, "study": 0.0}, []),
])
def test_encode_batch_skips_switched_off_and_empty_levels(model, series, structures, weights, expected):
    batch = make_batch(series_per_item=series, reports=[f"report {i}" for i in range(len(series))],
                       structures=structures)
    with torch.no_grad():
        levels = model.encode_batch(batch, level_weights=weights)
    assert list(levels) == expected


def test_each_present_series_is_encoded_once(model):
    calls = []
    handle = model.vision_model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            model.encode_batch(make_batch())
    finally:
        handle.remove()
    assert calls == [6]


@pytest.mark.parametrize("pooling", ["mean", "max", "attention"])
def test_structure_level_pools_patch_tokens_inside_the_box(pooling):
    model = tiny_model(structure_pooling=pooling)
    if pooling == "attention":
        with torch.no_grad():
            model.structure_pooling.query.normal_()
    batch = make_batch(series_per_item=(2, 1), structures=((0, 1, (8, 0, 0, 24, 16, 8)),),
                       reports=("a", "b"))
    with torch.no_grad():
        levels = model.encode_batch(batch, level_weights={"scan": 0.0, "structure": 1.0, "study": 0.0})
        _, tokens, grid = model.encode_series(batch["pixel_values"][0, 1:2])
        # patches (h, w, d) with h in {1, 2}, w in {0, 1}, d in {0, 1} of the 4x4x2 grid, in (h w d) order
        chosen = tokens[0, [h * 8 + w * 2 + d for h in (1, 2) for w in (0, 1) for d in (0, 1)]]  # (8, hidden)
        if pooling == "mean":
            pooled = chosen.mean(0)
        elif pooling == "max":
            pooled = chosen.amax(0)
        else:
            pool = model.structure_pooling
            scores = pool.key(pool.norm(chosen)) @ pool.query / chosen.shape[-1] ** 0.5
            pooled = torch.softmax(scores, 0) @ chosen
        want = F.normalize(model.structure_projection(pooled), dim=-1)
    assert torch.allclose(levels["structure"][0][0], want, atol=1e-5)


def test_structure_features_are_the_structure_level(model):
    batch = make_batch(series_per_item=(2,), structures=((0, 1, (8, 0, 0, 24, 16, 8)), (0, 0, (0, 0, 0, 8, 8, 4))),
                       reports=("a",))
    with torch.no_grad():
        levels = model.encode_batch(batch, level_weights={"scan": 0.0, "structure": 1.0, "study": 0.0})
        features = model.get_structure_features(batch["pixel_values"][0], batch["structure_boxes"],
                                                torch.tensor([1, 0]))
    assert features.shape == (2, 16)
    assert torch.allclose(F.normalize(features, dim=-1), levels["structure"][0], atol=1e-5)
    with pytest.raises(RadFM3DInputError, match="outside the 2 given series"):
        model.get_structure_features(batch["pixel_values"][0], batch["structure_boxes"], torch.tensor([2, 0]))
    with pytest.raises(RadFM3DInputError, match="one per box"):
        model.get_structure_features(batch["pixel_values"][0], batch["structure_boxes"], torch.tensor([0]))
    with pytest.raises(RadFM3DInputError, match=r"expected \(M, C, H, W, D\)"):
        model.get_structure_features(batch["pixel_values"], batch["structure_boxes"])


def test_box_patch_mask_hand_cases():
    patch = (8, 8, 4)
    boxes = torch.tensor([[0, 0, 0, 16, 8, 8],     # centres 4 and 12 on axis 0, 4 on axis 1, 2 and 6 on axis 2
                          [9, 9, 1, 10, 10, 2],    # smaller than a patch: the patch holding its centre
                          [40, -9, 0, 50, -1, 1]])  # outside the grid: the nearest patch
    mask = box_patch_mask(boxes, (4, 4, 2), patch).reshape(3, 4, 4, 2)
    first = torch.zeros(4, 4, 2, dtype=torch.bool)
    first[0:2, 0, :] = True
    assert torch.equal(mask[0], first)
    assert mask[1].nonzero().tolist() == [[1, 1, 0]]
    assert mask[2].nonzero().tolist() == [[3, 0, 0]]
    with pytest.raises(RadFM3DInputError, match="NaN"):
        box_patch_mask(torch.tensor([[0.0, 0, 0, float("nan"), 1, 1]]), (4, 4, 2), patch)


def test_encode_batch_rejects_a_structure_on_an_absent_series(model):
    batch = make_batch(series_per_item=(2, 1), structures=((1, 1, (0, 0, 0, 8, 8, 4)),), reports=("a", "b"))
    with pytest.raises(RadFM3DInputError, match="absent series"):
        model.encode_batch(batch)


def test_encode_batch_names_a_missing_key(model):
    batch = make_batch()
    del batch["report_group"]
    with pytest.raises(RadFM3DInputError, match="'report_group'"):
        model.encode_batch(batch)
    batch = make_batch()
    batch["structure_boxes"] = batch["structure_boxes"][:1]
    with pytest.raises(RadFM3DInputError, match="1 boxes for 2 structures"):
        model.encode_batch(batch)


def test_gradient_checkpointing_and_bf16_autocast_keep_the_levels():
    model = tiny_model()
    model.train()
    batch = make_batch()
    torch.manual_seed(0)
    reference = model.encode_batch(batch)
    model.set_gradient_checkpointing(True)
    torch.manual_seed(0)
    checkpointed = model.encode_batch(batch)
    total, _ = MultiLevelContrastiveLoss(model.config.level_weights)(checkpointed)
    total.backward()
    assert model.vision_model.patch_embedding.proj.weight.grad is not None
    assert model.text_model.embeddings.word_embeddings.weight.grad is not None
    for level in reference:
        assert torch.allclose(reference[level][0], checkpointed[level][0], atol=1e-5)
    model.set_gradient_checkpointing(False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.encode_batch(batch)
    for level in reference:
        assert low[level][0].dtype == torch.float32
        assert torch.allclose(reference[level][0].detach(), low[level][0], atol=0.1)


def test_attention_and_mean_fusion():
    mean_model = tiny_model(study_fusion="mean")
    assert not list(mean_model.study_fusion.parameters())
    features, mask = torch.randn(2, 3, 48), torch.tensor([[True, True, False], [True, True, True]])
    want = torch.stack([features[0, :2].mean(0), features[1].mean(0)])
    assert torch.allclose(mean_model.study_fusion(features, mask), want, atol=1e-6)
    attention = tiny_model().study_fusion
    assert torch.allclose(attention(features, mask), want, atol=1e-6)  # the zero query starts as the mean
    with torch.no_grad():
        attention.query.normal_()
    weights = attention.weights(features, mask)
    assert torch.allclose(weights.sum(1), torch.ones(2)) and float(weights[0, 2]) == 0.0
    assert not torch.allclose(weights[1], torch.full((3,), 1 / 3))


@pytest.mark.parametrize("mode", SetPooling.MODES)
@pytest.mark.parametrize("rows,members,dim", [(1, 1, 4), (3, 5, 8)])
def test_set_pooling_shapes_and_absent_members(mode, rows, members, dim):
    torch.manual_seed(1)
    pool = SetPooling(dim, mode)
    if mode == "attention":
        with torch.no_grad():
            pool.query.normal_()
    features = torch.randn(rows, members, dim)
    mask = torch.ones(rows, members, dtype=torch.bool)
    mask[:, 1:] = torch.rand(rows, members - 1) > 0.4
    out = pool(features, mask)
    assert out.shape == (rows, dim) and bool(torch.isfinite(out).all())
    changed = features.masked_fill(~mask.unsqueeze(-1), 1e6)  # an absent member never counts
    assert torch.allclose(pool(changed, mask), out, atol=1e-6)
    if mode == "max":
        assert torch.equal(out[0], features[0][mask[0]].amax(0))
    with pytest.raises(RadFM3DInputError, match="without any present member"):
        pool(features, torch.zeros(rows, members, dtype=torch.bool))
    with pytest.raises(RadFM3DInputError, match="mask"):
        pool(features, mask[:, :1] if members > 1 else mask.repeat(1, 2))


def test_attention_pooling_of_structures_is_saved_and_learns():
    model = tiny_model(structure_pooling="attention")
    assert {k for k in model.state_dict() if k.startswith("structure_pooling.")} == {
        "structure_pooling.query", "structure_pooling.norm.weight", "structure_pooling.norm.bias",
        "structure_pooling.key.weight"}
    model.train()
    levels = model.encode_batch(make_batch(), level_weights={"scan": 0.0, "structure": 1.0, "study": 0.0})
    loss = MultiLevelContrastiveLoss({"scan": 0.0, "structure": 1.0, "study": 0.0})(levels)[0]
    loss.backward()
    assert model.structure_pooling.query.grad is not None and float(model.structure_pooling.query.grad.abs().sum()) > 0


# --------------------------------------------------------------------------------------------- save / load
def test_save_load_identity(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = RadFM3DCLIPModel.from_pretrained(tmp_path)
    saved = {k: v for k, v in model.config.to_dict().items() if k != "architectures"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k != "architectures"} == saved
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        before, after = model.encode_batch(batch), loaded.encode_batch(batch)
    for level in before:
        for x, y in zip(before[level], after[level]):
            assert torch.equal(x, y)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    from transformers import AutoModel

    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, RadFM3DCLIPModel) and torch.equal(auto.logit_scale, model.logit_scale)


def _saved(model, tmp_path):
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    return folder


def test_from_pretrained_rejects_an_unknown_config_key(model, tmp_path):
    folder = _saved(model, tmp_path)
    data = json.loads((folder / "config.json").read_text())
    data["projection_dims"] = 16
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(RadFM3DInputError, match="unknown config key 'projection_dims'"):
        RadFM3DCLIPModel.from_pretrained(folder)


def test_from_pretrained_rejects_another_model_type(model, tmp_path):
    folder = _saved(model, tmp_path)
    data = json.loads((folder / "config.json").read_text())
    data["model_type"] = "radfm3d"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(RadFM3DInputError, match="model_type 'radfm3d'"):
        RadFM3DCLIPModel.from_pretrained(folder)


def test_from_pretrained_rejects_missing_nonfinite_and_misshapen_weights(model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(model, tmp_path)
    state = load_file(folder / "model.safetensors")
    partial = {k: v for k, v in state.items() if not k.startswith("text_projection")}
    save_file(partial, folder / "model.safetensors")
    with pytest.raises(RadFM3DInputError, match="missing keys.*text_projection.weight"):
        RadFM3DCLIPModel.from_pretrained(folder)
    broken = dict(state)
    broken["logit_scale"] = torch.tensor(float("nan"))
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(RadFM3DInputError, match="'logit_scale'.*NaN"):
        RadFM3DCLIPModel.from_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["projection_dim"] = 8
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(RadFM3DInputError, match="shape"):
        RadFM3DCLIPModel.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(RadFM3DInputError, match="no model.safetensors"):
        RadFM3DCLIPModel.from_pretrained(folder)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown level 'series'"):
        RadFM3DCLIPConfig.from_preset("tiny", text_config=TINY_TEXT_CONFIG, level_weights={"series": 1.0})
    with pytest.raises(ValueError, match="study_fusion"):
        RadFM3DCLIPConfig.from_preset("tiny", text_config=TINY_TEXT_CONFIG, study_fusion="sum")
    with pytest.raises(ValueError, match="structure_pooling must be one of"):
        RadFM3DCLIPConfig.from_preset("tiny", text_config=TINY_TEXT_CONFIG, structure_pooling="median")
    assert RadFM3DCLIPConfig.from_preset("tiny", text_config=TINY_TEXT_CONFIG).structure_pooling == "mean"
    with pytest.raises(ValueError, match="unknown config key 'projection_dims'"):
        RadFM3DCLIPConfig.from_preset("tiny", projection_dims=3)
    config = RadFM3DCLIPConfig.from_preset("tiny", text_config=TINY_TEXT_CONFIG, level_weights={"study": 0})
    assert config.level_weights == {"scan": 1.0, "structure": 1.0, "study": 0.0}
    assert config.num_image_tokens == 8 and config.resampler_config["dim"] == config.vision_config["hidden_size"]


# --------------------------------------------------------------------------------------------- training
def test_a_few_steps_lower_the_loss_on_a_toy_batch():
    """Four distinct volumes (a bright block in a different place each), four reports, two of them identical."""
    model = tiny_model(level_weights={"scan": 1.0, "structure": 1.0, "study": 1.0})
    model.train()
    batch = make_batch(series_per_item=(2, 1, 1, 2), reports=("left", "right", "right", "upper"),
                       structures=((0, 0, (0, 0, 0, 16, 16, 8)), (3, 1, (16, 16, 0, 32, 32, 8))))
    pv = batch["pixel_values"] * 0.1
    for i, (h, w) in enumerate([(0, 0), (16, 0), (16, 0), (0, 16)]):
        pv[i, :, :, h:h + 16, w:w + 16] += 0.9
    batch["pixel_values"] = pv * batch["image_mask"][:, :, None, None, None, None]
    criterion = MultiLevelContrastiveLoss(model.config.level_weights)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        total, terms = criterion(model.encode_batch(batch))
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        losses.append(float(total))
    assert set(terms) == {"scan", "structure", "study"}
    assert losses[-1] < 0.5 * losses[0], losses


def test_text_tower_from_a_local_sentence_transformers_or_bert_folder(tmp_path):
    """A sentence-transformers folder whose Transformer module sits in a subfolder, and that subfolder itself."""
    from transformers import BertConfig, BertModel

    from radfm3d.contrastive.configuration import resolve_text_model

    torch.manual_seed(3)
    bert = BertModel(BertConfig(**{k: v for k, v in TINY_TEXT_CONFIG.items() if k != "model_type"}),
                     add_pooling_layer=False)
    inner = tmp_path / "st" / "0_Transformer"
    bert.save_pretrained(inner)
    (tmp_path / "st" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    assert resolve_text_model(tmp_path / "st") == inner and resolve_text_model(inner) == inner
    for source in (tmp_path / "st", inner):
        model = RadFM3DCLIPModel.from_pretrained("tiny", text_model_name_or_path=str(source), projection_dim=8)
        for name, tensor in bert.state_dict().items():
            assert torch.equal(model.text_model.state_dict()[name], tensor), name
    with pytest.raises(RadFM3DInputError, match="no config.json"):
        resolve_text_model(tmp_path)
    with pytest.raises(RadFM3DInputError, match="not a folder"):
        resolve_text_model(tmp_path / "missing")


# --------------------------------------------------------------------------------------------- real MiniLM
def test_minilm_text_tower_matches_sentence_transformers():
    """The alias loads the installed MiniLM's BERT: our mean pooling reproduces its sentence embeddings."""
    from radfm3d.contrastive import RadFM3DCLIPProcessor
    from radfm3d.evaluation.metrics import load_sentence_encoder

    model = RadFM3DCLIPModel.from_pretrained("tiny", projection_dim=16)
    assert model.config.text_config["hidden_size"] == 384 and model.config.text_config["num_hidden_layers"] == 6
    processor = RadFM3DCLIPProcessor.from_pretrained("tiny")
    texts = ["No abnormality.", "A 12 mm nodule in the right upper lobe."]
    enc = processor(text=texts)
    with torch.no_grad():
        hidden = model.text_model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        ours = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    theirs = torch.as_tensor(load_sentence_encoder().encode(texts, normalize_embeddings=True))
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert model.get_text_features(enc["input_ids"], enc["attention_mask"]).shape == (2, 16)


# --------------------------------------------------------------------------------------------- frozen text cache
def _count_text_forwards(model: RadFM3DCLIPModel) -> list[int]:
    calls = [0]

    def hook(module, args, kwargs, output):
        calls[0] += int(kwargs["input_ids"].shape[0]) if "input_ids" in kwargs else int(args[0].shape[0])

    model.text_model.register_forward_hook(hook, with_kwargs=True)
    return calls


def test_a_frozen_text_tower_encodes_each_sequence_once_and_matches_the_uncached_encoding():
    model = tiny_model()
    model.freeze(text=True)
    model.train()
    assert not model.text_model.training, "a frozen text tower runs deterministically"
    calls = _count_text_forwards(model)
    ids = torch.randint(1000, 3000, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[3] = ids[0]  # a duplicate text in the batch is encoded once
    first = model.get_text_features(ids, mask)
    assert calls[0] == 3
    # the same texts, padded differently, come from the cache
    padded = torch.cat([ids, torch.zeros(4, 3, dtype=ids.dtype)], dim=1)
    again = model.get_text_features(padded, torch.cat([mask, torch.zeros(4, 3, dtype=mask.dtype)], dim=1))
    assert calls[0] == 3
    torch.testing.assert_close(again, first)
    # gradients still reach the trainable projection
    again.sum().backward()
    assert model.text_projection.weight.grad is not None
    model.text_cache_size = 0
    torch.testing.assert_close(model.get_text_features(ids, mask), first, atol=1e-5, rtol=1e-5)
    assert calls[0] == 7


def test_the_text_cache_is_dropped_when_a_text_weight_changes():
    model = tiny_model()
    model.freeze(text=True)
    ids = torch.randint(1000, 3000, (2, 6))
    before = model.get_text_features(ids)
    state = {k: v.clone() for k, v in model.text_model.state_dict().items()}
    with torch.no_grad():
        model.text_model.embeddings.word_embeddings.weight.mul_(2.0)
    changed = model.get_text_features(ids)
    assert not torch.allclose(changed, before), "an edited text tower must not be served from the cache"
    model.text_model.load_state_dict(state)
    torch.testing.assert_close(model.get_text_features(ids), before, atol=1e-5, rtol=1e-5)


def test_a_trained_text_tower_is_never_cached_and_gets_gradients():
    model = tiny_model()
    model.freeze(text=False)
    model.train()
    assert model.text_model.training
    calls = _count_text_forwards(model)
    ids = torch.randint(1000, 3000, (2, 6))
    model.get_text_features(ids).sum().backward()
    model.get_text_features(ids)
    assert calls[0] == 4
    assert model.text_model.embeddings.word_embeddings.weight.grad is not None
    model.freeze(text=True)
    assert not model.text_model.training
