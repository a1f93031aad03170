# Copyright (c) radfm3d contributors. Apache-2.0.
"""Test helpers for the official-RadFM converter (no radfm3d.modeling import here, on purpose).

1. :func:`build_state_dict` (from ``radfm3d.interop.synthetic``, shared with ``benchmarks/bench_radfm_scale.py``)
   makes a synthetic state dict with exactly the key tree and shape rules of the official RadFM
   ``pytorch_model.bin`` (../shared/design/RADFM_CHECKPOINT.md §2.2), here at the tiny dimensions of
   :class:`TinyRadFMDims`, including the modules unused at inference (BERT, DETR decoder, upsampler, heads) and the
   stale buffers (``rotary_emb.inv_freq``, ``bert_model.embeddings.position_ids``); ``embedding_layer.weight`` is
   the same tensor as ``lang_model.model.embed_tokens.weight`` (tied, as in RadFM).
2. :class:`RadFMReference` is an independent implementation of RadFM's inference maths written from the facts
   page, working directly on the *original* keys: einops patch flatten ``b c (h p1) (w p2) (f pf) -> b (h w f)
   (p1 p2 pf c)``, strided 3D position lookup, ViT blocks with ``chunk(3)`` qkv, flamingo perceiver with K/V over
   ``[media; latents]``, ``fc``, the one-hot embedding table ``[vocab; figure_token_weight; visual tokens]`` and a
   stock transformers ``LlamaForCausalLM`` for the language model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import LlamaForCausalLM

from radfm3d.interop.synthetic import RadFMDims, build_state_dict

__all__ = ["RadFMReference", "TinyRadFMDims", "build_state_dict"]


@dataclass
class TinyRadFMDims(RadFMDims):
    """RadFM hyper-parameters scaled down (official values, the :class:`RadFMDims` defaults, in comments)."""

    patch: tuple[int, int, int] = (4, 4, 2)  # (32, 32, 4)
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
    vocab: int = 64  # 32000
    hidden: int = 32  # 5120
    intermediate: int = 56  # 13824
    llm_layers: int = 2  # 40
    llm_heads: int = 4  # 40
    max_positions: int = 256  # 2048
    bert_hidden: int = 16  # 768
    bert_layers: int = 2  # 12
    bert_vocab: int = 30  # 28895


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
