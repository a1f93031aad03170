# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadFM's ``Quick_demo/Language_files`` tokenizer: a LLaMA-style sentencepiece ``tokenizer.model`` (trained here,
BPE with byte fallback, unk/bos/eos = 0/1/2) beside RadFM's exact ``tokenizer_config.json`` (empty special-token
strings, model_max_length 1e30), ``special_tokens_map.json`` (``{}``) and its legacy LLaMA ``config.json``; the
first two make transformers 5 recurse forever.
Checked: the ids RadFM forces (unk 0, bos 1, eos 2, pad 0), encodings identical to sentencepiece's own, the image
tokens at the config's ids after ``convert-radfm --tokenizer``, and a processor that loads from the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from radfm_reference import TinyRadFMDims, build_state_dict  # noqa: E402

from radfm3d.errors import RadFM3DInputError  # noqa: E402
from radfm3d.interop.radfm import cli, convert_radfm, load_radfm_tokenizer  # noqa: E402

VOCAB = 400
DIMS = TinyRadFMDims(vocab=VOCAB)
RADFM_TOKENIZER_CONFIG = ('{"bos_token": "", "eos_token": "", "model_max_length": 1e30, '
                          '"tokenizer_class": "LlamaTokenizer", "unk_token": ""}')
TEXTS = ["Is there a nodule in the right upper lobe?", "The liver is enlarged (3.5 cm lesion).",
         " leading space", "two  spaces\nand a newline\tand a tab ", "", "   ", "unicode: ünïcode ✓ 日本 12345",
         "Brain MRI: no mass; ventricles normal."]


@pytest.fixture(scope="module")
def language_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Language_files folder: a real sentencepiece model (LLaMA's trainer settings at a vocabulary of 400)."""
    import sentencepiece as spm
    folder = tmp_path_factory.mktemp("Language_files")
    corpus = folder.parent / "corpus.txt"
    lines = ["The chest CT shows a 12 mm nodule in the right upper lobe.", "No acute findings!",
             "the liver is enlarged with a hypodense lesion (3.5 cm)",
             "Brain MRI without contrast shows no mass; ventricles normal.", "Is there a pleural effusion?"]
    corpus.write_text("\n".join(lines * 40), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(RADFM_TOKENIZER_CONFIG)
    (folder / "special_tokens_map.json").write_text("{}")
    # RadFM's Language_files also hold the LLaMA config.json of the old conversion (bos 0, eos 1, pad -1)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1,
        "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 13824, "max_sequence_length": 2048,
        "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40, "rms_norm_eps": 1e-06,
        "vocab_size": 32000}))
    return folder


@pytest.fixture(scope="module")
def sp(language_files: Path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(language_files / "tokenizer.model"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("radfm_tok_src") / "pytorch_model.bin"
    torch.save(build_state_dict(DIMS, seed=0), path)
    return path


def test_language_files_load_with_radfm_ids(language_files: Path, sp) -> None:
    tokenizer = load_radfm_tokenizer(language_files, model_max_length=2048)
    assert len(tokenizer) == VOCAB == sp.get_piece_size()
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0, 1, 2, 0)
    assert tokenizer.model_max_length == 2048
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text  # BOS, then exactly what sentencepiece gives; no EOS
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text)) == text


def test_convert_radfm_with_language_files(language_files: Path, sp, source: Path, tmp_path: Path) -> None:
    from radfm3d.processing import RadFM3DProcessor

    out = tmp_path / "radfm"
    convert_radfm(source, out, config=DIMS.radfm3d_config(), tokenizer=language_files, progress=False)
    processor = RadFM3DProcessor.from_pretrained(out)
    assert processor.image_token_ids == {"image_start_token_id": VOCAB, "image_end_token_id": VOCAB + 1,
                                         "image_token_id": VOCAB + 2}
    tok = processor.tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.model_max_length == DIMS.max_positions
    assert processor.recipe.intensity == "minmax"
    # a prompt with one image: BOS, the text as sentencepiece encodes it, and start + N pads + end in place
    ids, _ = processor._encode_prompt("<image>Is there a nodule?", 1, 0, None)
    n = processor.num_image_tokens
    assert ids == [1] + sp.encode("") + [VOCAB] + [VOCAB + 2] * n + [VOCAB + 1] + sp.encode("Is there a nodule?")
    enc = processor(text="Is there a nodule?", return_tensors=None)
    assert enc["input_ids"][0] == [1] + sp.encode("Is there a nodule?")
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["tokenizer"] == "." and (saved["bos_token_id"], saved["eos_token_id"]) == (1, 2)

    from radfm3d.modeling import RadFM3DForCausalLM

    processor.check_config(RadFM3DForCausalLM.from_pretrained(out).config)


def test_cli_convert_with_language_files(language_files: Path, source: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(DIMS.radfm3d_config()))
    out = tmp_path / "radfm"
    assert cli([str(source), str(out), "--tokenizer", str(language_files), "--config", str(config),
                "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_conversion_without_tokenizer_says_so(source: Path, tmp_path: Path) -> None:
    from radfm3d.processing import RadFM3DProcessor

    out = tmp_path / "radfm"
    convert_radfm(source, out, config=DIMS.radfm3d_config(), progress=False)
    with pytest.raises(RadFM3DInputError, match="--tokenizer"):
        RadFM3DProcessor.from_pretrained(out)


def test_bad_tokenizer_folders_are_refused_before_converting(language_files: Path, source: Path,
                                                             tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    (broken / "tokenizer_config.json").write_text(RADFM_TOKENIZER_CONFIG)
    with pytest.raises(RadFM3DInputError, match="tokenizer.model"):
        convert_radfm(source, tmp_path / "out", config=DIMS.radfm3d_config(), tokenizer=broken, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RadFM3DInputError, match="not found"):
        load_radfm_tokenizer(tmp_path / "missing")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "tokenizer.model").write_bytes((language_files / "tokenizer.model").read_bytes())
    (bad_json / "tokenizer_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(RadFM3DInputError, match="tokenizer_config.json"):
        load_radfm_tokenizer(bad_json)
    # a vocabulary that does not match the LLM's (here the 400-piece model against a 64-row LLM) is refused
    with pytest.raises(RadFM3DInputError, match="base vocabulary"):
        convert_radfm(source, tmp_path / "out", config=TinyRadFMDims().radfm3d_config(), tokenizer=language_files,
                      progress=False)


def test_a_fast_tokenizer_folder_with_radfm_configs_loads_too(language_files: Path, tmp_path: Path) -> None:
    """tokenizer.json instead of tokenizer.model, beside the same empty-token configs: no recursion, same ids."""
    load_radfm_tokenizer(language_files).save_pretrained(tmp_path / "saved")
    fast = tmp_path / "fast"
    fast.mkdir()
    (fast / "tokenizer.json").write_bytes((tmp_path / "saved" / "tokenizer.json").read_bytes())
    (fast / "tokenizer_config.json").write_text(RADFM_TOKENIZER_CONFIG)
    (fast / "special_tokens_map.json").write_text("{}")
    tokenizer = load_radfm_tokenizer(fast, model_max_length=512)
    assert len(tokenizer) == VOCAB and tokenizer.model_max_length == 512
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0, 1, 2, 0)
