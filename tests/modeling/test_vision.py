# Copyright (c) radfm3d contributors. Apache-2.0.
"""3D ViT: shapes, RadFM-compatible numerics against an independent reference, position lookup, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radfm3d.modeling.vision import VisionConfig, VisionTransformer3D, strided_position_index


@pytest.mark.parametrize(
    "patch, size, hidden, heads, dim_head, final_norm, patch_norm",
    [
        ((8, 8, 4), (32, 32, 8), 48, 4, None, False, True),
        ((8, 8, 4), (16, 32, 4), 48, 4, 8, True, True),  # inner 32 != hidden 48
        ((4, 4, 2), (8, 8, 8), 24, 2, 16, False, False),
        ((16, 16, 4), (64, 32, 16), 60, 3, 20, True, True),  # 60 = 3 x 20: equal pos split
    ],
)
def test_shapes(patch, size, hidden, heads, dim_head, final_norm, patch_norm):
    cfg = VisionConfig(
        in_channels=2, patch_size=patch, hidden_size=hidden, depth=2, num_heads=heads, dim_head=dim_head,
        mlp_dim=2 * hidden, final_norm=final_norm, patch_norm=patch_norm, pos_table=(8, 8, 16),
    )
    model = VisionTransformer3D(cfg).eval()
    x = torch.rand(3, 2, *size)
    out = model(x)
    n = (size[0] // patch[0]) * (size[1] // patch[1]) * (size[2] // patch[2])
    assert out.shape == (3, n, hidden)
    assert torch.isfinite(out).all()
    # each sample is encoded independently of the others in the batch
    torch.testing.assert_close(model(x[1:2]), out[1:2], rtol=1e-5, atol=1e-5)


def test_indivisible_volume_and_bad_channels_raise():
    model = VisionTransformer3D(VisionConfig(patch_size=(8, 8, 4), hidden_size=24, num_heads=2, depth=1, mlp_dim=24,
                                             pos_table=(8, 8, 8)))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 3, 30, 32, 8))
    with pytest.raises(ValueError, match="expected pixel_values"):
        model(torch.rand(1, 1, 32, 32, 8))


def test_strided_position_index_matches_radfm_facts():
    # facts page: 512^2 in-plane with patch 32 -> rows 0..15; 256^2 -> rows 1,3,...,15; D=4 -> 127; D=64 -> 7,15,...,127
    assert strided_position_index(16, 16).tolist() == list(range(16))
    assert strided_position_index(8, 16).tolist() == list(range(1, 16, 2))
    assert strided_position_index(1, 128).tolist() == [127]
    assert strided_position_index(16, 128).tolist() == list(range(7, 128, 8))
    with pytest.raises(ValueError):
        strided_position_index(17, 16)


def test_position_table_values_and_order():
    cfg = VisionConfig(patch_size=(4, 4, 2), hidden_size=12, num_heads=2, depth=1, mlp_dim=12, pos_table=(4, 8, 8),
                       pos_dims=(4, 4, 4))
    model = VisionTransformer3D(cfg)
    pe = model.pos_embedding
    pos = pe((2, 4, 2))  # tokens in (h w d) order
    assert pos.shape == (16, 12)
    h, w, d = 1, 2, 1
    token = (h * 4 + w) * 2 + d
    torch.testing.assert_close(pos[token, 0:4], pe.row_embed.weight[(h + 1) * 2 - 1])
    torch.testing.assert_close(pos[token, 4:8], pe.col_embed.weight[(w + 1) * 2 - 1])
    torch.testing.assert_close(pos[token, 8:12], pe.dep_embed.weight[(d + 1) * 4 - 1])


def _reference_radfm_vit(model: VisionTransformer3D, x: torch.Tensor) -> torch.Tensor:
    """Independent re-statement of the RadFM ViT maths from the facts page (einops patching, explicit softmax)."""
    from einops import rearrange

    cfg = model.config
    p1, p2, pf = cfg.patch_size
    sd = {k: v for k, v in model.state_dict().items()}
    t = rearrange(x, "b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)", p1=p1, p2=p2, pf=pf)
    t = F.layer_norm(t, (t.shape[-1],), sd["patch_embedding.norm_in.weight"], sd["patch_embedding.norm_in.bias"])
    t = F.linear(t, sd["patch_embedding.proj.weight"], sd["patch_embedding.proj.bias"])
    t = F.layer_norm(t, (t.shape[-1],), sd["patch_embedding.norm_out.weight"], sd["patch_embedding.norm_out.bias"])
    nh, nw, nf = x.shape[2] // p1, x.shape[3] // p2, x.shape[4] // pf
    rows = sd["pos_embedding.row_embed.weight"][[(i + 1) * (cfg.pos_table[0] // nh) - 1 for i in range(nh)]]
    cols = sd["pos_embedding.col_embed.weight"][[(i + 1) * (cfg.pos_table[1] // nw) - 1 for i in range(nw)]]
    deps = sd["pos_embedding.dep_embed.weight"][[(i + 1) * (cfg.pos_table[2] // nf) - 1 for i in range(nf)]]
    pos = torch.stack([
        torch.cat([rows[i], cols[j], deps[k]]) for i in range(nh) for j in range(nw) for k in range(nf)
    ])
    t = t + pos
    heads, dh = cfg.num_heads, cfg.dim_head
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (t.shape[-1],), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"]).chunk(3, dim=-1)
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=heads) for a in (q, k, v))
        attn = (q @ k.transpose(-1, -2) * dh**-0.5).softmax(-1)
        o = rearrange(attn @ v, "b h n d -> b n (h d)")
        t = t + F.linear(o, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        y = F.layer_norm(t, (t.shape[-1],), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.linear1.weight"], sd[p + "mlp.linear1.bias"])),
                     sd[p + "mlp.linear2.weight"], sd[p + "mlp.linear2.bias"])
        t = t + y
    return t  # RadFM: no final norm


def test_radfm_like_variant_matches_reference():
    # small analog of RadFM (768 wide, 8 heads x 64 = 512 inner, table 16/16/128 x 256): 24 wide, 2 x 8 = 16 inner
    cfg = VisionConfig(in_channels=3, patch_size=(4, 4, 2), hidden_size=24, depth=2, num_heads=2, dim_head=8,
                       mlp_dim=40, dropout=0.1, emb_dropout=0.1, patch_norm=True, final_norm=False, qkv_bias=False,
                       pos_table=(8, 8, 16), pos_dims=(8, 8, 8))
    model = VisionTransformer3D(cfg).eval()
    keys = model.state_dict().keys()
    assert "blocks.0.attn.qkv.bias" not in keys and "final_norm.weight" not in keys
    assert model.state_dict()["blocks.0.attn.qkv.weight"].shape == (48, 24)
    assert model.state_dict()["blocks.0.attn.out_proj.weight"].shape == (24, 16)
    x = torch.rand(2, 3, 16, 8, 4)  # grid 4 x 2 x 2: strided rows 1,3,5,7 / 3,7 / 7,15
    ref = _reference_radfm_vit(model, x)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # eval mode is deterministic even with dropout 0.1 (MONAI's SDPA path would still drop attention weights)
    assert torch.equal(model(x), out)


def test_gradient_checkpointing_same_gradients():
    cfg = VisionConfig(patch_size=(4, 4, 2), hidden_size=24, depth=2, num_heads=2, mlp_dim=24, pos_table=(4, 4, 4))
    torch.manual_seed(0)
    model = VisionTransformer3D(cfg).train()
    x = torch.rand(2, 3, 8, 8, 4)
    model(x).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(x).square().mean().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_config_roundtrip_and_validation():
    cfg = VisionConfig(hidden_size=768, num_heads=8, dim_head=64, pos_table=(16, 16, 128), patch_size=(32, 32, 4))
    assert cfg.pos_dims == (256, 256, 256) and cfg.inner_dim == 512 and cfg.patch_dim == 12288
    again = VisionConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="sum"):
        VisionConfig(hidden_size=24, num_heads=2, pos_dims=(8, 8, 9))
    assert VisionConfig(hidden_size=25, num_heads=5).pos_dims == (8, 8, 9)
