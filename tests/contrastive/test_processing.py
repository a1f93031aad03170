# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadFM3DCLIPProcessor: MiniLM tokenisation, image preprocessing shared with the generative processor, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from radfm3d.contrastive import RadFM3DCLIPProcessor
from radfm3d.errors import RadFM3DInputError
from radfm3d.processing import RadFM3DProcessor
from radfm3d.transforms import PreprocessingRecipe


@pytest.fixture(scope="module")
def processor() -> RadFM3DCLIPProcessor:
    return RadFM3DCLIPProcessor.from_pretrained("tiny")


def _volume(seed: int, shape=(20, 24, 10)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 1000).astype(np.float32)


def test_text_is_tokenised_with_the_text_towers_wordpiece(processor):
    enc = processor(text=["No abnormality.", "A nodule in the right upper lobe."])
    assert set(enc) == {"input_ids", "attention_mask"}
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    cls_id, sep_id = processor.tokenizer.cls_token_id, processor.tokenizer.sep_token_id
    assert ids[:, 0].tolist() == [cls_id, cls_id]
    short = int(mask[0].sum())
    assert ids[0, short - 1] == sep_id and mask[0, short:].sum() == 0 and bool(mask[1].all())  # right padding
    assert processor.batch_decode(ids)[0] == "no abnormality."
    long = processor(text=["word " * 500])
    assert long["input_ids"].shape[1] == processor.max_text_length == 128
    assert processor(text="one text")["input_ids"].shape[0] == 1


def test_images_match_the_generative_processor(processor, synthetic_volume):
    from radfm3d.io import load_image

    image = load_image(synthetic_volume.array, affine=synthetic_volume.affine)
    enc = processor(images=[image, _volume(1)])
    assert enc["pixel_values"].shape == (2, 3, 32, 32, 8) and enc["pixel_values"].dtype == torch.float32
    reference = RadFM3DProcessor.from_model_config("tiny")
    want, geometry = reference.preprocess_image(image)
    assert torch.equal(enc["pixel_values"][0], want)
    assert enc["grid_geometry"][0][0] == geometry


def test_study_lists_give_series_and_a_mask(processor):
    enc = processor(text=["a", "b"], images=[[_volume(1), _volume(2), _volume(3)], [_volume(4)]],
                    modalities=[["CT", "MR", "MR"], ["CT"]])
    assert enc["pixel_values"].shape == (2, 3, 3, 32, 32, 8)
    assert enc["image_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert float(enc["pixel_values"][1, 1:].abs().sum()) == 0.0
    ct = processor.preprocess_image(_volume(2), "CT")[0]
    assert not torch.equal(enc["pixel_values"][0, 1], ct)  # the MR series was scaled as MR, not with CT windows
    with pytest.raises(RadFM3DInputError, match="modalities"):
        processor(images=[[_volume(1)], [_volume(2)]], modalities=["CT", "MR", "MR"])


def test_bad_inputs_are_named(processor):
    with pytest.raises(RadFM3DInputError, match="give text, images or both"):
        processor()
    with pytest.raises(RadFM3DInputError, match="not a string"):
        processor(text=["fine", 3])
    with pytest.raises(RadFM3DInputError, match="preprocessed image grid"):
        processor(images=[torch.rand(3, 16, 16, 8)], images_are_preprocessed=True)


def test_save_and_reload_give_the_same_inputs(processor, tmp_path):
    custom = RadFM3DCLIPProcessor(processor.tokenizer, PreprocessingRecipe(spatial_size=(32, 32, 16)),
                                  max_text_length=16)
    custom.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"processor_config.json", "preprocessing.json", "tokenizer.json"} <= names
    assert not any(n.startswith(".processor-") for n in names)
    loaded = RadFM3DCLIPProcessor.from_pretrained(tmp_path)
    assert loaded.recipe == custom.recipe and loaded.max_text_length == 16
    texts, images = ["No abnormality in the chest.", "word " * 40], [_volume(5)]
    a, b = custom(text=texts, images=images), loaded(text=texts, images=images)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(a[key], b[key]), key
    assert a["input_ids"].shape[1] == 16


def test_a_model_folder_without_processor_files_uses_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "radfm3d_clip", "max_text_length": 24,
                                                      "text_model_name_or_path": "all-minilm-l6-v2"}))
    PreprocessingRecipe(spatial_size=(64, 64, 16)).save(tmp_path)
    loaded = RadFM3DCLIPProcessor.from_pretrained(tmp_path)
    assert loaded.max_text_length == 24 and tuple(loaded.recipe.spatial_size) == (64, 64, 16)
    (tmp_path / "processor_config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RadFM3DInputError, match="not a radfm3d CLIP processor config"):
        RadFM3DCLIPProcessor.from_pretrained(tmp_path)
    with pytest.raises(RadFM3DInputError, match="not a CLIP processor folder"):
        RadFM3DCLIPProcessor.from_pretrained(tmp_path / "missing")
