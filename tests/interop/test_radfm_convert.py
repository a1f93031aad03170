# Copyright (c) radfm3d contributors. Apache-2.0.
"""The official-RadFM converter on a synthetic checkpoint with the exact RadFM key tree (tiny dimensions):
conversion, strict loading, numerics against an independent reference, key errors, refusal of bad pickles,
atomic output, CLI, tokenizer ids and the peak-RSS bound on a >= 2 GB checkpoint (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from radfm_reference import RadFMReference, TinyRadFMDims, build_state_dict  # noqa: E402

from radfm3d.interop.radfm import (  # noqa: E402
    DROPPED_MODULES,
    cli,
    convert_radfm,
    load_radfm_state_dict,
    map_radfm_key,
    parse_size,
)

DIMS = TinyRadFMDims()


def _error_text(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("radfm_src")
    state = build_state_dict(DIMS, seed=0)
    path = folder / "pytorch_model.bin"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 conversion (exact comparison), small shards so the LLM is really sharded."""
    out = tmp_path_factory.mktemp("radfm_out") / "radfm-tiny"
    convert_radfm(source[0], out, config=DIMS.radfm3d_config(), dtype="float32", shard_size="24KB", progress=False)
    return out


@pytest.fixture(scope="module")
def model(converted: Path):
    from radfm3d.modeling import RadFM3DForCausalLM

    return RadFM3DForCausalLM.from_pretrained(converted)


@pytest.fixture(scope="module")
def reference(source) -> RadFMReference:
    return RadFMReference(source[1], DIMS)


# ----------------------------------------------------------------------------------------------- layout
def test_folder_layout_and_report(converted: Path, source) -> None:
    state = source[1]
    names = sorted(p.name for p in converted.iterdir())
    assert names == ["config.json", "conversion_report.json", "language_model", "model.safetensors",
                     "preprocessing.json", "processor_config.json"]
    assert not list(converted.parent.glob("*.partial-*"))
    report = json.loads((converted / "conversion_report.json").read_text())
    assert report["dtype"] == "float32"
    assert report["kept"]["tensors"] + report["dropped"]["tensors"] == len(state)
    dropped = set(report["dropped"]["keys"])
    for prefix in DROPPED_MODULES:
        in_src = {k for k in state if k.startswith(prefix)}
        assert in_src and in_src <= dropped, prefix
    assert {k for k in state if k.endswith("rotary_emb.inv_freq")} <= dropped
    assert "embedding_layer.bert_model.embeddings.position_ids" in dropped
    assert "embedding_layer.weight" in dropped  # tied duplicate of the LLM's embed_tokens
    assert not any(k.startswith(("lang_model.model.layers.0.self_attn.q", "embedding_layer.vision_encoder"))
                   for k in dropped)
    assert len(report["files"]) > 2  # sharded LLM + model.safetensors
    index = json.loads((converted / "language_model" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {k[len("lang_model."):] for k in state
                                        if k.startswith("lang_model.") and "inv_freq" not in k}
    config = json.loads((converted / "config.json").read_text())
    assert config["projector_type"] == "linear"
    assert config["text_model_name_or_path"] == "language_model"  # relative: the folder can move
    processor = json.loads((converted / "processor_config.json").read_text())
    assert (processor["image_start_token_id"], processor["image_end_token_id"], processor["image_token_id"]) == (
        DIMS.vocab, DIMS.vocab + 1, DIMS.vocab + 2)
    recipe = json.loads((converted / "preprocessing.json").read_text())
    assert recipe["intensity"] == "minmax" and recipe["depth_multiple"] == 4
    gen = json.loads((converted / "language_model" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_llm_folder_is_a_stock_llama_folder(converted: Path) -> None:
    from transformers import LlamaForCausalLM

    llm, info = LlamaForCausalLM.from_pretrained(converted / "language_model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert llm.config.num_hidden_layers == DIMS.llm_layers


def test_key_mapping_examples() -> None:
    assert map_radfm_key("embedding_layer.vision_encoder.transformer.layers.11.0.fn.to_qkv.weight") == (
        "vision_model.blocks.11.attn.qkv.weight")
    assert map_radfm_key("embedding_layer.vision_encoder.to_patch_embedding.1.bias") == (
        "vision_model.patch_embedding.norm_in.bias")
    assert map_radfm_key("embedding_layer.perceiver.layers.5.1.3.weight") == "resampler.layers.5.1.3.weight"
    assert map_radfm_key("lang_model.lm_head.weight") == "language_model.lm_head.weight"
    assert map_radfm_key("embedding_layer.something_new.weight") is None


# ----------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("size", [(16, 16, 4), (8, 8, 8)])
def test_visual_tokens_match_reference(model, reference: RadFMReference, size: tuple[int, int, int]) -> None:
    """(16,16,4) reads table rows 0..3 / depth 7; (8,8,8) the strided rows 1,3 / depth 1,3,5,7."""
    torch.manual_seed(1)
    pixels = torch.rand(2, 2, 3, *size)  # (B, S, C, H, W, D) in [0, 1]
    with torch.no_grad():
        ours = model.get_image_features(pixels)
    ref = reference.image_features(pixels)
    assert ours.shape == (2, 2, DIMS.num_latents, DIMS.hidden)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """The same two-image prompt in RadFM ids (visual token k = vocab+2+k) and in ours (one placeholder id)."""
    v, n = DIMS.vocab, DIMS.num_latents
    start, end = v, v + 1
    radfm = [1, 10, 11, start, *range(v + 2, v + 2 + n), end, 12, start, *range(v + 2 + n, v + 2 + 2 * n), end, 13, 14]
    ours = [t if t < v + 2 else v + 2 for t in radfm]
    return torch.tensor([radfm]), torch.tensor([ours])


def test_logits_match_reference(model, reference: RadFMReference) -> None:
    torch.manual_seed(2)
    pixels = torch.rand(1, 2, 3, 16, 16, 4)
    radfm_ids, our_ids = _prompts()
    with torch.no_grad():
        ours = model(input_ids=our_ids, pixel_values=pixels).logits
    ref = reference.logits(radfm_ids, pixels)
    assert ours.shape == (1, our_ids.shape[1], DIMS.vocab)
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=1e-5)


def test_generation_matches_one_hot_reference(model, reference: RadFMReference) -> None:
    torch.manual_seed(3)
    pixels = torch.rand(1, 2, 3, 16, 16, 4)
    radfm_ids, our_ids = _prompts()
    expected = reference.greedy(radfm_ids, pixels, max_new_tokens=10, eos=2)
    out = model.generate(our_ids, pixel_values=pixels, max_new_tokens=10, do_sample=False)
    new = out[0, our_ids.shape[1]:].tolist()
    assert new[: len(expected)] == expected
    assert len(set(expected)) > 1  # a real sequence, not one repeated token


def test_bf16_default_writes_bf16_values(source, tmp_path: Path) -> None:
    path, state = source
    out = tmp_path / "bf16"
    result = convert_radfm(path, out, config=DIMS.radfm3d_config(), progress=False)
    assert result.report["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        qkv = f.get_tensor("vision_model.blocks.1.attn.qkv.weight")
        extra = f.get_tensor("extra_token_embeddings.weight")
    src = state["embedding_layer.vision_encoder.transformer.layers.1.0.fn.to_qkv.weight"]
    assert qkv.dtype == torch.bfloat16 and torch.equal(qkv, src.to(torch.bfloat16))
    fig = state["embedding_layer.figure_token_weight"].to(torch.bfloat16)
    assert torch.equal(extra[0], fig[0]) and torch.equal(extra[1], fig[1]) and not extra[2].any()
    with safe_open(str(out / "language_model" / "model.safetensors"), framework="pt") as f:  # one shard: 2 GB limit
        assert torch.equal(f.get_tensor("lm_head.weight"), state["lang_model.lm_head.weight"].to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------- errors
def _save(tmp_path: Path, obj: object, name: str = "pytorch_model.bin") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_missing_key_is_named(tmp_path: Path) -> None:
    state = build_state_dict(DIMS)
    del state["embedding_layer.perceiver.layers.1.0.to_q.weight"]
    with pytest.raises(ValueError) as excinfo:
        convert_radfm(_save(tmp_path, state), tmp_path / "out", config=DIMS.radfm3d_config(), progress=False)
    assert "missing" in _error_text(excinfo) and "embedding_layer.perceiver.layers.1.0.to_q.weight" in _error_text(
        excinfo)
    assert not (tmp_path / "out").exists()


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    state = build_state_dict(DIMS)
    state["embedding_layer.vision_encoder.extra_head.weight"] = torch.zeros(2, 2)
    state["lang_model.model.layers.0.self_attn.q_norm.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as excinfo:
        convert_radfm(_save(tmp_path, state), tmp_path / "out", config=DIMS.radfm3d_config(), progress=False)
    text = _error_text(excinfo)
    assert "unknown" in text and "embedding_layer.vision_encoder.extra_head.weight" in text
    assert "lang_model.model.layers.0.self_attn.q_norm.weight" in text


def test_shape_mismatch_and_broken_tie_are_named(tmp_path: Path) -> None:
    state = build_state_dict(DIMS)
    state["embedding_layer.fc.weight"] = torch.zeros(DIMS.hidden, DIMS.vis_dim + 1)
    state["embedding_layer.weight"] = state["embedding_layer.weight"].clone() + 1.0
    with pytest.raises(ValueError) as excinfo:
        convert_radfm(_save(tmp_path, state), tmp_path / "out", config=DIMS.radfm3d_config(), progress=False)
    assert "embedding_layer.fc.weight" in _error_text(excinfo) and "tied" in _error_text(excinfo)


class _NotATensor:
    def __init__(self) -> None:
        self.payload = [1, 2, 3]


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([torch.zeros(2)], "expected a state dict"),
        ({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, "entry 'state_dict' is a dict"),
        ({"weights": _NotATensor()}, "refused"),
    ],
    ids=["list", "training-checkpoint", "arbitrary-object"],
)
def test_non_state_dict_pickles_are_refused(tmp_path: Path, obj: object, needle: str) -> None:
    path = _save(tmp_path, obj)
    with pytest.raises(ValueError) as excinfo:
        load_radfm_state_dict(path)
    assert needle in _error_text(excinfo) and str(path) in _error_text(excinfo)


def test_interrupted_conversion_leaves_no_complete_looking_folder(source, tmp_path: Path) -> None:
    out = tmp_path / "out"
    calls: list[Path] = []

    def boom(path: Path) -> None:
        calls.append(path)
        raise KeyboardInterrupt("simulated interruption after the first shard")

    with pytest.raises(KeyboardInterrupt):
        convert_radfm(source[0], out, config=DIMS.radfm3d_config(), shard_size="24KB", progress=False,
                      on_shard_written=boom)
    assert len(calls) == 1 and calls[0].is_file() is False  # the partial folder (and its shard) are gone
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(source, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists"):
        convert_radfm(source[0], out, config=DIMS.radfm3d_config(), progress=False)
    assert (out / "keep.txt").is_file()
    convert_radfm(source[0], out, config=DIMS.radfm3d_config(), progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli(source, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "tiny-radfm.json"
    config.write_text(json.dumps(DIMS.radfm3d_config()))
    out = tmp_path / "cli-out"
    assert cli([str(source[0]), str(out), "--config", str(config), "--no-progress", "--dtype", "float16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "conversion_report.json").read_text())["dtype"] == "float16"
    assert cli([str(tmp_path / "nope.bin"), str(tmp_path / "o2"), "--config", str(config)]) == 2
    assert "not found" in capsys.readouterr().err


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(500) == 500
    with pytest.raises(ValueError):
        parse_size("lots")


def test_tokenizer_gets_image_tokens_at_the_config_ids(source, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, DIMS.vocab)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tok_dir)
    out = tmp_path / "out"
    convert_radfm(source[0], out, config=DIMS.radfm3d_config(), tokenizer=tok_dir, progress=False)
    from transformers import AutoTokenizer

    from radfm3d.processing import IMAGE_END_TOKEN, IMAGE_PAD_TOKEN, IMAGE_START_TOKEN

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids([IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_PAD_TOKEN]) == [
        DIMS.vocab, DIMS.vocab + 1, DIMS.vocab + 2]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["tokenizer"] == "." and processor["image_pad_token"] == IMAGE_PAD_TOKEN
    # a tokenizer that already carries RadFM's added tokens would shift the ids: refused
    with pytest.raises(ValueError, match="base vocabulary"):
        convert_radfm(source[0], tmp_path / "out2", config=DIMS.radfm3d_config(), tokenizer=out, progress=False)


# ----------------------------------------------------------------------------------------------- memory
_MAKE_BIG = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {here!r})
    from radfm_reference import TinyRadFMDims, build_state_dict
    d = TinyRadFMDims(hidden=1024, intermediate=2816, llm_layers=int({layers}), llm_heads=8, vocab=32000)
    sd = build_state_dict(d)
    torch.save(sd, {path!r})
    import json; print(json.dumps(d.radfm3d_config()))
    """
)
_CONVERT = textwrap.dedent(
    """
    import json, resource, sys
    from radfm3d.interop.radfm import convert_radfm
    cfg = json.loads(open({cfg!r}).read())
    r = convert_radfm({path!r}, {out!r}, config=cfg, dtype="bfloat16", shard_size="256MB", progress=False).report
    print(json.dumps({{k: r[k] for k in ("peak_rss_bytes", "peak_rss_bound_bytes", "baseline_rss_bytes",
                     "seconds", "read_mb_per_s", "source_bytes", "written_bytes", "largest_tensor_bytes")}}))
    """
)


@pytest.mark.slow
def test_big_checkpoint_conversion_stays_under_peak_rss_bound(tmp_path: Path) -> None:
    """A >= 2 GB fp32 synthetic RadFM checkpoint (1024-wide, 32000-vocab fake LLM) converts with peak RSS (measured
    with getrusage in the converting subprocess) under the stated bound and far below the file size."""
    import shutil

    here = str(Path(__file__).parent)
    path, cfg, out = tmp_path / "big.bin", tmp_path / "cfg.json", tmp_path / "out"
    layers = 36  # 36 x 12.85 M params + 2 x 32.8 M vocab tables = 528 M params = 2.11 GB fp32
    # the 2.11 GB source and the 1.06 GB bf16 output live on disk together: a disk that cannot hold them fails here,
    # naming the space, instead of as a bare exit code halfway through the conversion
    needed = 2_112_646_705 + 1_056_211_312 + 256 * 2**20
    free = shutil.disk_usage(tmp_path).free
    assert free >= needed, f"needs {needed / 1e9:.1f} GB free under {tmp_path}, has {free / 1e9:.1f} GB"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def checked_run(script: str) -> subprocess.CompletedProcess:
        """Run ``script`` in a fresh interpreter; on failure show its stderr, not only its exit code."""
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert done.returncode == 0, f"exit {done.returncode}; stderr:\n{done.stderr[-4000:]}"
        return done

    made = checked_run(_MAKE_BIG.format(here=here, layers=layers, path=str(path)))
    cfg.write_text(made.stdout.strip().splitlines()[-1])
    try:
        size = path.stat().st_size
        assert size >= 2 * 10**9
        run = checked_run(_CONVERT.format(cfg=str(cfg), path=str(path), out=str(out)))
        report = json.loads(run.stdout.strip().splitlines()[-1])
        print("big conversion:", report)
        assert report["peak_rss_bytes"] <= report["peak_rss_bound_bytes"], report
        assert report["peak_rss_bytes"] < 0.5 * size, report
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)


def test_converted_folder_can_be_moved(converted: Path, tmp_path: Path, model) -> None:
    import shutil

    from radfm3d.modeling import RadFM3DForCausalLM

    moved = tmp_path / "elsewhere" / "radfm"
    shutil.copytree(converted, moved)
    again = RadFM3DForCausalLM.from_pretrained(moved)
    pixels = torch.rand(1, 1, 3, 16, 16, 4)
    with torch.no_grad():
        torch.testing.assert_close(again.get_image_features(pixels), model.get_image_features(pixels))


def test_peak_rss_is_this_process_not_the_parent_that_started_it() -> None:
    """``ru_maxrss`` survives exec, so a converter started by a big test runner would report the runner's peak (the
    big-conversion test failed that way under the full suite); peak_rss_bytes reads this address space's own mark."""
    import numpy as np

    ballast = np.ones(100_000_000)  # 800 MB resident in this (parent) process
    code = "from radfm3d.interop.radfm import peak_rss_bytes; print(peak_rss_bytes())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 600 * 2**20 < ballast.nbytes
