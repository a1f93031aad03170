# Copyright (c) radfm3d contributors. Apache-2.0.
"""Perceiver resampler: shapes, key layout (RadFM's), numerics against an explicit flamingo-style reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radfm3d.modeling.resampler import PerceiverResampler, ResamplerConfig


@pytest.mark.parametrize(
    "dim, latents, depth, heads, dim_head, tokens",
    [(32, 8, 1, 2, 16, 5), (48, 4, 2, 4, 8, 64), (24, 32, 3, 3, 8, 1)],
)
def test_shapes(dim, latents, depth, heads, dim_head, tokens):
    model = PerceiverResampler(ResamplerConfig(dim=dim, num_latents=latents, depth=depth, heads=heads,
                                               dim_head=dim_head)).eval()
    media = torch.randn(3, tokens, dim)
    out = model(media)
    assert out.shape == (3, latents, dim)
    torch.testing.assert_close(model(media[2:]), out[2:], rtol=1e-5, atol=1e-5)


def test_state_dict_matches_radfm_key_tree():
    model = PerceiverResampler(ResamplerConfig(dim=24, num_latents=4, depth=2, heads=2, dim_head=8, ff_mult=4))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["latents"] == (4, 24)
    assert shapes["layers.1.0.to_q.weight"] == (16, 24)
    assert shapes["layers.1.0.to_kv.weight"] == (32, 24)
    assert shapes["layers.1.0.to_out.weight"] == (24, 16)
    assert shapes["layers.1.1.1.weight"] == (96, 24) and shapes["layers.1.1.3.weight"] == (24, 96)
    assert {"layers.0.0.norm_media.weight", "layers.0.0.norm_latents.bias", "layers.0.1.0.weight", "norm.bias"} <= set(shapes)
    assert not any(k.endswith("to_q.bias") or k.endswith("1.1.bias") for k in shapes)


def _reference(model: PerceiverResampler, media: torch.Tensor) -> torch.Tensor:
    """Flamingo maths written out: K/V over [media; latents], scaled softmax, residuals, final LayerNorm."""
    sd = model.state_dict()
    cfg = model.config
    b = media.shape[0]
    lat = sd["latents"].expand(b, -1, -1)
    for i in range(cfg.depth):
        p = f"layers.{i}."
        x = F.layer_norm(media, (cfg.dim,), sd[p + "0.norm_media.weight"], sd[p + "0.norm_media.bias"])
        l_ = F.layer_norm(lat, (cfg.dim,), sd[p + "0.norm_latents.weight"], sd[p + "0.norm_latents.bias"])
        q = F.linear(l_, sd[p + "0.to_q.weight"])
        kv = F.linear(torch.cat([x, l_], dim=1), sd[p + "0.to_kv.weight"])
        k, v = kv.chunk(2, dim=-1)
        split = lambda t: t.reshape(b, t.shape[1], cfg.heads, cfg.dim_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(q) * cfg.dim_head**-0.5, split(k), split(v)
        sim = q @ k.transpose(-1, -2)
        attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(b, -1, cfg.heads * cfg.dim_head)
        lat = F.linear(o, sd[p + "0.to_out.weight"]) + lat
        y = F.layer_norm(lat, (cfg.dim,), sd[p + "1.0.weight"], sd[p + "1.0.bias"])
        lat = F.linear(F.gelu(F.linear(y, sd[p + "1.1.weight"])), sd[p + "1.3.weight"]) + lat
    return F.layer_norm(lat, (cfg.dim,), sd["norm.weight"], sd["norm.bias"])


def test_matches_reference():
    torch.manual_seed(0)
    model = PerceiverResampler(ResamplerConfig(dim=32, num_latents=6, depth=3, heads=4, dim_head=8, ff_mult=4)).eval()
    media = torch.randn(2, 20, 32)
    torch.testing.assert_close(model(media), _reference(model, media), rtol=1e-4, atol=1e-5)


def test_bad_input_shape_raises():
    model = PerceiverResampler(ResamplerConfig(dim=16, num_latents=2, depth=1, heads=2, dim_head=8))
    with pytest.raises(ValueError, match="expected media tokens"):
        model(torch.randn(2, 5, 8))


def test_pooled_latent_init_ties_each_latent_to_one_block_of_the_volume():
    config = ResamplerConfig(dim=16, num_latents=8, depth=1, heads=2, dim_head=8, latent_init="pooled",
                             pool_grid=(2, 2, 2))
    model = PerceiverResampler(config).eval()
    grid = (4, 4, 2)
    media = torch.randn(2, 32, 16)
    pooled = model.pooled_media(media, grid)
    volume = media.transpose(1, 2).reshape(2, 16, *grid)
    # latent 0 = mean over the first 2x2x1 block of the (h w d)-ordered patch grid
    torch.testing.assert_close(pooled[:, 0], volume[:, :, :2, :2, :1].mean(dim=(2, 3, 4)))
    torch.testing.assert_close(pooled[:, 7], volume[:, :, 2:, 2:, 1:].mean(dim=(2, 3, 4)))
    out = model(media, grid=grid)
    assert out.shape == (2, 8, 16)
    # a change confined to one block of the volume moves its own latent most
    changed = volume.clone()
    changed[:, :, 2:, 2:, 1:] += 5.0
    moved = (model(changed.flatten(2).transpose(1, 2), grid=grid) - out).norm(dim=-1)
    assert int(moved.argmax(dim=-1)[0]) == 7 and int(moved.argmax(dim=-1)[1]) == 7
    with pytest.raises(ValueError, match="grid"):
        model(media)
    with pytest.raises(ValueError, match="pool_grid"):
        ResamplerConfig(num_latents=8, latent_init="pooled", pool_grid=(2, 2, 3))
    assert ResamplerConfig.from_dict(config.to_dict()) == config
