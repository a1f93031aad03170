# Copyright (c) radfm3d contributors. Apache-2.0.
"""Test helpers for the official-RadFM converter (no radfm3d.modeling import here, on purpose).

1. :func:`build_state_dict` makes a synthetic state dict with exactly the key tree and shape rules of the official
   RadFM ``pytorch_model.bin`` (../shared/design/RADFM_CHECKPOINT.md §2.2) at tiny dimensions, including the
   modules unused at inference (BERT, DETR decoder, upsampler, heads) and the stale buffers
   (``rotary_emb.inv_freq``, ``bert_model.embeddings.position_ids``); ``embedding_layer.weight`` is the same
   tensor as ``lang_model.model.embed_tokens.weight`` (tied, as in RadFM).
2. :class:`RadFMReference` is an independent implementation of RadFM's inference maths written from the facts
   page, working directly on the *original* keys: einops patch flatten ``b c (h p1) (w p2) (f pf) -> b (h w f)
   (p1 p2 pf c)``, strided 3D position lookup, ViT blocks with ``chunk(3)`` qkv, flamingo perceiver with K/V over
   ``[media; latents]``, ``fc``, the one-hot embedding table ``[vocab; figure_token_weight; visual tokens]`` and a
   stock transformers ``LlamaForCausalLM`` for the language model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass
class TinyRadFMDims:
    """RadFM hyper-parameters scaled down (official values in comments)."""

    patch: tuple[int, int, int] = (4, 4, 2)  # (32, 32, 4)
    channels: int = 3
    vis_dim: int = 24  # 768
    pos_feats: int = 8  # 256 (x3 = vis_dim)
    pos_table: tuple[int, int, int] = (4, 4, 8)  # (16, 16, 128)
    vit_depth: int = 2  # 12
    vit_heads: int = 2  # 8
    vit_dim_head: int = 8  # 64 -> inner 16 != vis_dim, like 512 != 768
    vit_mlp: int = 40  # 2048
    num_latents: int = 4  # 32
    perceiver_depth: int = 2  # 6
    perceiver_heads: int = 2  # 8
    perceiver_dim_head: int = 8  # 64
    ff_mult: int = 4
    vocab: int = 64  # 32000
    hidden: int = 32  # 5120
    intermediate: int = 56  # 13824
    llm_layers: int = 2  # 40
    llm_heads: int = 4  # 40
    max_positions: int = 256  # 2048
    # unused modules (shapes follow the same rules; sizes irrelevant)
    bert_hidden: int = 16  # 768
    bert_layers: int = 2  # 12
    bert_vocab: int = 30  # 28895
    decoder_layers: int = 4
    extra: dict = field(default_factory=dict)

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch[0] * self.patch[1] * self.patch[2]

    @property
    def llm_head_dim(self) -> int:
        return self.hidden // self.llm_heads

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.llm_layers, num_attention_heads=self.llm_heads, num_key_value_heads=self.llm_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )

    def radfm3d_config(self) -> dict:
        """The matching radfm3d config (what the converter is given), as a plain dict."""
        return {
            "vision_config": {
                "in_channels": self.channels, "patch_size": list(self.patch), "hidden_size": self.vis_dim,
                "depth": self.vit_depth, "num_heads": self.vit_heads, "dim_head": self.vit_dim_head,
                "mlp_dim": self.vit_mlp, "dropout": 0.1, "emb_dropout": 0.1, "patch_norm": True,
                "final_norm": False, "qkv_bias": False, "pos_table": list(self.pos_table),
                "pos_dims": [self.pos_feats] * 3,
            },
            "resampler_config": {"depth": self.perceiver_depth, "heads": self.perceiver_heads,
                                 "dim_head": self.perceiver_dim_head, "ff_mult": self.ff_mult},
            "num_image_tokens": self.num_latents,
            "projector_type": "linear",
            "text_config": {"model_type": "llama", **{k: v for k, v in self.llama_config().to_dict().items()
                                                      if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                               "num_hidden_layers", "num_attention_heads",
                                                               "num_key_value_heads", "max_position_embeddings",
                                                               "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
                                                               "eos_token_id", "pad_token_id")}},
        }


def _lin(gen: torch.Generator, out_f: int, in_f: int, bias: bool = True, scale: float | None = None) -> dict:
    scale = scale if scale is not None else in_f**-0.5
    out = {"weight": torch.randn(out_f, in_f, generator=gen) * scale}
    if bias:
        out["bias"] = torch.randn(out_f, generator=gen) * 0.02
    return out


def _ln(gen: torch.Generator, n: int) -> dict:
    return {"weight": 1.0 + 0.1 * torch.randn(n, generator=gen), "bias": 0.05 * torch.randn(n, generator=gen)}


def _put(sd: dict, prefix: str, params: dict) -> None:
    for name, tensor in params.items():
        sd[f"{prefix}.{name}"] = tensor


def build_state_dict(dims: TinyRadFMDims | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The official RadFM key tree (``lang_model.*`` + ``embedding_layer.*``) at ``dims``; fp32, random."""
    d = dims or TinyRadFMDims()
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    # ---------------------------------------------------------------- language model (transformers 4.28 naming)
    embed = torch.randn(d.vocab, d.hidden, generator=g) * 0.5
    sd["lang_model.model.embed_tokens.weight"] = embed
    for i in range(d.llm_layers):
        p = f"lang_model.model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{p}.self_attn.{name}.weight"] = torch.randn(d.hidden, d.hidden, generator=g) * d.hidden**-0.5
        sd[f"{p}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, d.llm_head_dim, 2).float() / d.llm_head_dim)
        )
        sd[f"{p}.mlp.gate_proj.weight"] = torch.randn(d.intermediate, d.hidden, generator=g) * d.hidden**-0.5
        sd[f"{p}.mlp.up_proj.weight"] = torch.randn(d.intermediate, d.hidden, generator=g) * d.hidden**-0.5
        sd[f"{p}.mlp.down_proj.weight"] = torch.randn(d.hidden, d.intermediate, generator=g) * d.intermediate**-0.5
        sd[f"{p}.input_layernorm.weight"] = 1.0 + 0.1 * torch.randn(d.hidden, generator=g)
        sd[f"{p}.post_attention_layernorm.weight"] = 1.0 + 0.1 * torch.randn(d.hidden, generator=g)
    sd["lang_model.model.norm.weight"] = 1.0 + 0.1 * torch.randn(d.hidden, generator=g)
    sd["lang_model.lm_head.weight"] = torch.randn(d.vocab, d.hidden, generator=g) * d.hidden**-0.5
    # ---------------------------------------------------------------- embedding layer (vision side)
    e = "embedding_layer"
    sd[f"{e}.weight"] = embed  # tied: the very same tensor object, as in RadFM
    sd[f"{e}.figure_token_weight"] = torch.randn(2, d.hidden, generator=g) * 0.5
    v = f"{e}.vision_encoder"
    _put(sd, f"{v}.to_patch_embedding.1", _ln(g, d.patch_dim))
    _put(sd, f"{v}.to_patch_embedding.2", _lin(g, d.vis_dim, d.patch_dim))
    _put(sd, f"{v}.to_patch_embedding.3", _ln(g, d.vis_dim))
    for name, rows in zip(("row_embed", "col_embed", "dep_embed"), d.pos_table):
        sd[f"{v}.pos_embedding.{name}.weight"] = torch.rand(rows, d.pos_feats, generator=g)
    inner = d.vit_heads * d.vit_dim_head
    for i in range(d.vit_depth):
        p = f"{v}.transformer.layers.{i}"
        _put(sd, f"{p}.0.norm", _ln(g, d.vis_dim))
        sd[f"{p}.0.fn.to_qkv.weight"] = torch.randn(3 * inner, d.vis_dim, generator=g) * d.vis_dim**-0.5
        _put(sd, f"{p}.0.fn.to_out.0", _lin(g, d.vis_dim, inner))
        _put(sd, f"{p}.1.norm", _ln(g, d.vis_dim))
        _put(sd, f"{p}.1.fn.net.0", _lin(g, d.vit_mlp, d.vis_dim))
        _put(sd, f"{p}.1.fn.net.3", _lin(g, d.vis_dim, d.vit_mlp))
    pr = f"{e}.perceiver"
    sd[f"{pr}.latents"] = torch.randn(d.num_latents, d.vis_dim, generator=g)
    pinner = d.perceiver_heads * d.perceiver_dim_head
    for i in range(d.perceiver_depth):
        p = f"{pr}.layers.{i}"
        _put(sd, f"{p}.0.norm_media", _ln(g, d.vis_dim))
        _put(sd, f"{p}.0.norm_latents", _ln(g, d.vis_dim))
        _put(sd, f"{p}.0.to_q", _lin(g, pinner, d.vis_dim, bias=False))
        _put(sd, f"{p}.0.to_kv", _lin(g, 2 * pinner, d.vis_dim, bias=False))
        _put(sd, f"{p}.0.to_out", _lin(g, d.vis_dim, pinner, bias=False))
        _put(sd, f"{p}.1.0", _ln(g, d.vis_dim))
        _put(sd, f"{p}.1.1", _lin(g, d.ff_mult * d.vis_dim, d.vis_dim, bias=False))
        _put(sd, f"{p}.1.3", _lin(g, d.vis_dim, d.ff_mult * d.vis_dim, bias=False))
    _put(sd, f"{pr}.norm", _ln(g, d.vis_dim))
    _put(sd, f"{e}.fc", _lin(g, d.hidden, d.vis_dim))
    # ---------------------------------------------------------------- unused at inference
    bh = d.bert_hidden
    b = f"{e}.bert_model"
    sd[f"{b}.embeddings.word_embeddings.weight"] = torch.randn(d.bert_vocab, bh, generator=g)
    sd[f"{b}.embeddings.position_embeddings.weight"] = torch.randn(16, bh, generator=g)
    sd[f"{b}.embeddings.token_type_embeddings.weight"] = torch.randn(2, bh, generator=g)
    _put(sd, f"{b}.embeddings.LayerNorm", _ln(g, bh))
    sd[f"{b}.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)  # stale buffer
    for i in range(d.bert_layers):
        p = f"{b}.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            _put(sd, f"{p}.attention.self.{name}", _lin(g, bh, bh))
        _put(sd, f"{p}.attention.output.dense", _lin(g, bh, bh))
        _put(sd, f"{p}.attention.output.LayerNorm", _ln(g, bh))
        _put(sd, f"{p}.intermediate.dense", _lin(g, 4 * bh, bh))
        _put(sd, f"{p}.output.dense", _lin(g, bh, 4 * bh))
        _put(sd, f"{p}.output.LayerNorm", _ln(g, bh))
    _put(sd, f"{b}.pooler.dense", _lin(g, bh, bh))
    _put(sd, f"{e}.bert_projection_fc", _lin(g, d.vis_dim, d.vis_dim))
    vd = d.vis_dim
    sd[f"{e}.output_upscaling.0.weight"] = torch.randn(vd, vd // 4, 2, 2, 2, generator=g)
    sd[f"{e}.output_upscaling.0.bias"] = torch.randn(vd // 4, generator=g)
    _put(sd, f"{e}.output_upscaling.1", _ln(g, vd // 4))
    sd[f"{e}.output_upscaling.1.running_mean"] = torch.zeros(vd // 4)
    sd[f"{e}.output_upscaling.1.running_var"] = torch.ones(vd // 4)
    sd[f"{e}.output_upscaling.1.num_batches_tracked"] = torch.tensor(0)
    sd[f"{e}.output_upscaling.3.weight"] = torch.randn(vd // 4, vd // 8, 2, 2, 2, generator=g)
    sd[f"{e}.output_upscaling.3.bias"] = torch.randn(vd // 8, generator=g)
    for i in range(d.decoder_layers):
        p = f"{e}.transformer_decoder.layers.{i}"
        for att in ("self_attn", "multihead_attn"):
            sd[f"{p}.{att}.in_proj_weight"] = torch.randn(3 * vd, vd, generator=g)
            sd[f"{p}.{att}.in_proj_bias"] = torch.randn(3 * vd, generator=g)
            _put(sd, f"{p}.{att}.out_proj", _lin(g, vd, vd))
        _put(sd, f"{p}.linear1", _lin(g, 2 * vd, vd))
        _put(sd, f"{p}.linear2", _lin(g, vd, 2 * vd))
        for n in ("norm1", "norm2", "norm3"):
            _put(sd, f"{p}.{n}", _ln(g, vd))
    _put(sd, f"{e}.transformer_decoder.norm", _ln(g, vd))
    _put(sd, f"{e}.transformer_decoder_mlp.0", _lin(g, vd // 4, vd))
    _put(sd, f"{e}.transformer_decoder_mlp.2", _lin(g, vd // 8, vd // 4))
    _put(sd, f"{e}.cls_head", _lin(g, 1, vd // 8))
    return sd


# ============================================================================ reference maths (original keys)
def _layer_norm(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    w = sd[f"{prefix}.weight"]
    return F.layer_norm(x, w.shape, w, sd[f"{prefix}.bias"])


def _linear(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))


class RadFMReference:
    """RadFM inference on the original state dict: ``vision_x (B, S, 3, H, W, D)`` + ``lang_x`` with RadFM ids
    (``<image>`` = vocab, ``</image>`` = vocab+1, visual token k of the sample = vocab+2+k)."""

    def __init__(self, sd: dict[str, torch.Tensor], dims: TinyRadFMDims) -> None:
        self.sd = {k: v.float() for k, v in sd.items()}
        self.d = dims
        self.llm = LlamaForCausalLM(dims.llama_config()).eval()
        llm_sd = {k[len("lang_model."):]: v for k, v in self.sd.items()
                  if k.startswith("lang_model.") and "rotary_emb.inv_freq" not in k}
        self.llm.load_state_dict(llm_sd, strict=True)

    # ---------------------------------------------------------------- vision
    def vit(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W, D)`` -> ``(B, (H/p1)(W/p2)(D/pf), vis_dim)``."""
        d, sd = self.d, self.sd
        v = "embedding_layer.vision_encoder"
        p1, p2, pf = d.patch
        nh, nw, nf = x.shape[2] // p1, x.shape[3] // p2, x.shape[4] // pf
        t = rearrange(x, "b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)", p1=p1, p2=p2, pf=pf)
        t = _layer_norm(t, sd, f"{v}.to_patch_embedding.1")
        t = _linear(t, sd, f"{v}.to_patch_embedding.2")
        t = _layer_norm(t, sd, f"{v}.to_patch_embedding.3")

        def strided(n: int, table: int) -> torch.Tensor:
            return (torch.arange(n) + 1) * (table // n) - 1

        rows = sd[f"{v}.pos_embedding.row_embed.weight"][strided(nh, d.pos_table[0])]
        cols = sd[f"{v}.pos_embedding.col_embed.weight"][strided(nw, d.pos_table[1])]
        deps = sd[f"{v}.pos_embedding.dep_embed.weight"][strided(nf, d.pos_table[2])]
        pos = torch.cat(
            [
                rows[:, None, None].expand(nh, nw, nf, -1),
                cols[None, :, None].expand(nh, nw, nf, -1),
                deps[None, None, :].expand(nh, nw, nf, -1),
            ],
            dim=-1,
        ).reshape(nh * nw * nf, -1)
        t = t + pos
        heads, dh = d.vit_heads, d.vit_dim_head
        for i in range(d.vit_depth):
            p = f"{v}.transformer.layers.{i}"
            h = _layer_norm(t, sd, f"{p}.0.norm")
            q, k, val = F.linear(h, sd[f"{p}.0.fn.to_qkv.weight"]).chunk(3, dim=-1)
            q, k, val = (rearrange(z, "b n (h d) -> b h n d", h=heads) for z in (q, k, val))
            attn = torch.softmax(q @ k.transpose(-1, -2) * dh**-0.5, dim=-1)
            o = rearrange(attn @ val, "b h n d -> b n (h d)")
            t = t + _linear(o, sd, f"{p}.0.fn.to_out.0")
            h = _layer_norm(t, sd, f"{p}.1.norm")
            h = _linear(F.gelu(_linear(h, sd, f"{p}.1.fn.net.0")), sd, f"{p}.1.fn.net.3")
            t = t + h
        return t  # no final norm

    def perceiver(self, media: torch.Tensor) -> torch.Tensor:
        """``(B, T, vis_dim)`` -> ``(B, num_latents, vis_dim)`` (flamingo-pytorch maths)."""
        d, sd = self.d, self.sd
        pr = "embedding_layer.perceiver"
        latents = sd[f"{pr}.latents"].unsqueeze(0).expand(media.shape[0], -1, -1)
        heads, dh = d.perceiver_heads, d.perceiver_dim_head
        for i in range(d.perceiver_depth):
            p = f"{pr}.layers.{i}"
            x = _layer_norm(media, sd, f"{p}.0.norm_media")
            lat = _layer_norm(latents, sd, f"{p}.0.norm_latents")
            q = F.linear(lat, sd[f"{p}.0.to_q.weight"]) * dh**-0.5
            kv_input = torch.cat([x, lat], dim=1)
            k, val = F.linear(kv_input, sd[f"{p}.0.to_kv.weight"]).chunk(2, dim=-1)
            q, k, val = (rearrange(z, "b n (h d) -> b h n d", h=heads) for z in (q, k, val))
            sim = q @ k.transpose(-1, -2)
            sim = sim - sim.amax(dim=-1, keepdim=True)
            o = rearrange(sim.softmax(dim=-1) @ val, "b h n d -> b n (h d)")
            latents = F.linear(o, sd[f"{p}.0.to_out.weight"]) + latents
            ff = _layer_norm(latents, sd, f"{p}.1.0")
            ff = F.linear(F.gelu(F.linear(ff, sd[f"{p}.1.1.weight"])), sd[f"{p}.1.3.weight"])
            latents = ff + latents
        return _layer_norm(latents, sd, f"{pr}.norm")

    @torch.no_grad()
    def image_features(self, vision_x: torch.Tensor) -> torch.Tensor:
        """``(B, S, 3, H, W, D)`` -> ``(B, S, num_latents, hidden)`` (after ``fc``)."""
        b, s = vision_x.shape[:2]
        tokens = self.vit(vision_x.flatten(0, 1).float())
        out = _linear(self.perceiver(tokens), self.sd, "embedding_layer.fc")
        return out.reshape(b, s, *out.shape[1:])

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def input_embeds(self, lang_x: torch.Tensor, vision_x: torch.Tensor) -> torch.Tensor:
        """RadFM's one-hot table: ``one_hot(lang_x, len(E)) @ E`` with ``E = [weight; figure_token_weight; vision]``."""
        b = lang_x.shape[0]
        vision = self.image_features(vision_x).reshape(b, -1, self.d.hidden)  # (B, S*N, hidden)
        embeds = []
        for i in range(b):
            table = torch.cat([self.sd["embedding_layer.weight"], self.sd["embedding_layer.figure_token_weight"],
                               vision[i]])
            embeds.append(F.one_hot(lang_x[i], table.shape[0]).float() @ table)
        return torch.stack(embeds)

    @torch.no_grad()
    def logits(self, lang_x: torch.Tensor, vision_x: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=self.input_embeds(lang_x, vision_x)).logits

    @torch.no_grad()
    def greedy(self, lang_x: torch.Tensor, vision_x: torch.Tensor, max_new_tokens: int, eos: int = 2) -> list[int]:
        """Greedy decoding (batch 1, no cache, full recompute each step); stops after ``eos``."""
        embeds = self.input_embeds(lang_x, vision_x)
        table = self.sd["lang_model.model.embed_tokens.weight"]
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.llm(inputs_embeds=embeds).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == eos:
                break
            embeds = torch.cat([embeds, table[nxt].view(1, 1, -1)], dim=1)
        return new
