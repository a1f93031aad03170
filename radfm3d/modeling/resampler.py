# Copyright (c) radfm3d contributors. Apache-2.0.
"""Perceiver resampler (Flamingo style, as in RadFM): any number of media tokens -> N latent tokens.

State-dict layout (identical to RadFM's ``embedding_layer.perceiver.*`` keys, so a converter maps by prefix only)::

    latents                                    (num_latents, dim)
    layers.{i}.0.norm_media.{weight,bias}      LayerNorm(dim)
    layers.{i}.0.norm_latents.{weight,bias}    LayerNorm(dim)
    layers.{i}.0.to_q.weight                   (heads*dim_head, dim)       no bias
    layers.{i}.0.to_kv.weight                  (2*heads*dim_head, dim)     no bias, output split k|v
    layers.{i}.0.to_out.weight                 (dim, heads*dim_head)       no bias
    layers.{i}.1.0.{weight,bias}               LayerNorm(dim)
    layers.{i}.1.1.weight                      (ff_mult*dim, dim)          no bias, then GELU
    layers.{i}.1.3.weight                      (dim, ff_mult*dim)          no bias
    norm.{weight,bias}                         LayerNorm(dim)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ResamplerConfig", "PerceiverAttention", "PerceiverResampler"]


@dataclass
class ResamplerConfig:
    """Hyper-parameters of :class:`PerceiverResampler`. RadFM: dim 768, num_latents 32, depth 6, heads 8,
    dim_head 64, ff_mult 4."""

    dim: int = 256
    num_latents: int = 32
    depth: int = 2
    heads: int = 4
    dim_head: int = 64
    ff_mult: int = 4
    #: "learned" (RadFM: the latents start as learned constants) or "pooled" (each latent starts as learned
    #: constant + the average of the media tokens in one cell of a ``pool_grid`` partition of the patch grid)
    latent_init: str = "learned"
    pool_grid: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.latent_init not in ("learned", "pooled"):
            raise ValueError(f"latent_init must be 'learned' or 'pooled', got {self.latent_init!r}")
        if self.latent_init == "pooled":
            grid = tuple(int(g) for g in (self.pool_grid or ()))
            if len(grid) != 3 or grid[0] * grid[1] * grid[2] != self.num_latents:
                raise ValueError(f"latent_init 'pooled' needs pool_grid (3 ints) whose product is num_latents "
                                 f"{self.num_latents}, got {self.pool_grid}")
            self.pool_grid = grid  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["pool_grid"] is not None:
            data["pool_grid"] = list(data["pool_grid"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | ResamplerConfig | None) -> ResamplerConfig:
        if isinstance(data, ResamplerConfig):
            return data
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(data or {}).items() if k in names})


class PerceiverAttention(nn.Module):
    """Latents attend to ``[media; latents]``: ``(B, T, dim), (B, N, dim) -> (B, N, dim)`` (SDPA, no biases)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, h*d) -> (B, h, L, d)
            return t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=self.dim_head**-0.5)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear(no bias) -> GELU -> Linear(no bias) (indices 0, 1, 2, 3 as in RadFM)."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverResampler(nn.Module):
    """``(B, T, dim)`` media tokens -> ``(B, num_latents, dim)``; residual attention + feed-forward, final LayerNorm.

    With ``latent_init="pooled"`` the latents start from the media averaged over a ``pool_grid`` partition of the
    patch grid (``forward(media, grid=(nh, nw, nd))``), so latent i is tied to one block of the volume from the first
    step. Why: with RadFM's learned constant latents the output is dominated by those constants at initialisation and
    where-is-what must be discovered through attention alone; on the CPU budget of the demo model that did not
    happen (region recognition stayed at chance for hundreds of steps, while a position-preserving readout of the
    same patches learns it in twenty).
    """

    def __init__(self, config: ResamplerConfig | dict[str, Any]) -> None:
        super().__init__()
        config = ResamplerConfig.from_dict(config)
        self.config = config
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.dim))
        if config.latent_init == "pooled":
            nn.init.normal_(self.latents, std=0.02)  # a small learned offset on top of the pooled media
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(config.dim, config.dim_head, config.heads), _feed_forward(config.dim, config.ff_mult)]
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        self.gradient_checkpointing = enable

    def _layer(self, index: int, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layers[index]
        latents = attn(media, latents) + latents
        return ff(latents) + latents

    def pooled_media(self, media: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``(B, nh*nw*nd, dim)`` tokens in ``(h w d)`` order -> ``(B, num_latents, dim)`` block averages."""
        b, t, dim = media.shape
        nh, nw, nd = (int(g) for g in grid)
        if nh * nw * nd != t:
            raise ValueError(f"grid {tuple(grid)} does not hold {t} media tokens")
        volume = media.transpose(1, 2).reshape(b, dim, nh, nw, nd)
        pooled = F.adaptive_avg_pool3d(volume, self.config.pool_grid)  # type: ignore[arg-type]
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, media: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """``media (B, T, dim)`` -> ``(B, num_latents, dim)``; ``grid`` = the patch grid, needed for "pooled"."""
        if media.ndim != 3 or media.shape[-1] != self.config.dim:
            raise ValueError(f"expected media tokens (B, T, {self.config.dim}), got {tuple(media.shape)}")
        latents = self.latents.to(media.dtype).unsqueeze(0).expand(media.shape[0], -1, -1)
        if self.config.latent_init == "pooled":
            if grid is None:
                raise ValueError("latent_init 'pooled' needs the patch grid: resampler(media, grid=(nh, nw, nd))")
            latents = latents + self.pooled_media(media, grid)
        for i in range(len(self.layers)):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                latents = checkpoint(self._layer, i, media, latents, use_reentrant=False)
            else:
                latents = self._layer(i, media, latents)
        return self.norm(latents)
