# Copyright (c) radfm3d contributors. Apache-2.0.
"""3D vision transformer (MONAI blocks, PyTorch SDPA attention), including a RadFM-compatible variant.

Volumes ``(B, C, H, W, D)`` (channel-first, depth last, MONAI layout) are cut into non-overlapping patches
``(ph, pw, pd)`` and turned into tokens ``(B, n_patches, hidden)`` with ``n_patches = (H/ph)(W/pw)(D/pd)``
in ``(h w d)`` order.

State-dict layout of :class:`VisionTransformer3D` (what a weight converter maps onto)::

    patch_embedding.norm_in.{weight,bias}      LayerNorm(patch_dim)         (only if patch_norm)
    patch_embedding.proj.{weight,bias}         Linear(patch_dim, hidden)    patch_dim = C*ph*pw*pd, order (p1 p2 pd c)
    patch_embedding.norm_out.{weight,bias}     LayerNorm(hidden)            (only if patch_norm)
    pos_embedding.{row_embed,col_embed,dep_embed}.weight   (table_h, dim_h), (table_w, dim_w), (table_d, dim_d)
    blocks.{i}.norm1.{weight,bias}             LayerNorm(hidden)
    blocks.{i}.attn.qkv.weight (+ .bias if qkv_bias)   Linear(hidden, 3*heads*dim_head), layout (qkv, head, dim)
    blocks.{i}.attn.out_proj.{weight,bias}     Linear(heads*dim_head, hidden)
    blocks.{i}.norm2.{weight,bias}             LayerNorm(hidden)
    blocks.{i}.mlp.linear1.{weight,bias}       Linear(hidden, mlp_dim)   -> GELU -> dropout
    blocks.{i}.mlp.linear2.{weight,bias}       Linear(mlp_dim, hidden)   -> dropout
    final_norm.{weight,bias}                   LayerNorm(hidden)         (only if final_norm)

RadFM mapping (``embedding_layer.vision_encoder.`` prefix): ``to_patch_embedding.{1,2,3}`` ->
``patch_embedding.{norm_in,proj,norm_out}``; ``pos_embedding.*`` -> ``pos_embedding.*``;
``transformer.layers.{i}.0.norm`` -> ``blocks.{i}.norm1``; ``...0.fn.to_qkv`` -> ``blocks.{i}.attn.qkv``;
``...0.fn.to_out.0`` -> ``blocks.{i}.attn.out_proj``; ``...1.norm`` -> ``blocks.{i}.norm2``;
``...1.fn.net.0`` -> ``blocks.{i}.mlp.linear1``; ``...1.fn.net.3`` -> ``blocks.{i}.mlp.linear2``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, SABlock
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "VisionConfig",
    "PatchEmbedding3D",
    "FactorisedPositionEmbedding3D",
    "SDPASelfAttention",
    "ViTBlock3D",
    "VisionTransformer3D",
    "strided_position_index",
]


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"VisionConfig.{name} needs 3 values (h, w, d), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass
class VisionConfig:
    """Hyper-parameters of :class:`VisionTransformer3D` (JSON-serialisable through :meth:`to_dict`).

    ``pos_table`` is the number of rows of the factorised learned position tables per axis (in patches);
    ``pos_dims`` their feature widths (concatenated row|col|depth, must sum to ``hidden_size``; ``None``
    splits ``hidden_size`` into three, the remainder going to depth). RadFM: patch (32, 32, 4), hidden 768,
    depth 12, heads 8, dim_head 64 (inner 512), mlp 2048, patch_norm True, final_norm False, qkv_bias False,
    pos_table (16, 16, 128), pos_dims (256, 256, 256), dropout 0.1, emb_dropout 0.1.
    """

    in_channels: int = 3
    patch_size: tuple[int, int, int] = (16, 16, 4)
    hidden_size: int = 256
    depth: int = 4
    num_heads: int = 4
    dim_head: int | None = None  # None -> hidden_size // num_heads
    mlp_dim: int = 1024
    dropout: float = 0.0
    emb_dropout: float = 0.0
    patch_norm: bool = True
    final_norm: bool = False
    qkv_bias: bool = False
    pos_table: tuple[int, int, int] = (16, 16, 16)
    pos_dims: tuple[int, int, int] | None = None
    gradient_checkpointing: bool = False
    extra: dict = field(default_factory=dict)  # unknown keys kept for forward compatibility

    def __post_init__(self) -> None:
        self.patch_size = _triple(self.patch_size, "patch_size")
        self.pos_table = _triple(self.pos_table, "pos_table")
        if self.pos_dims is None:
            third = self.hidden_size // 3
            self.pos_dims = (third, third, self.hidden_size - 2 * third)
        self.pos_dims = _triple(self.pos_dims, "pos_dims")
        if sum(self.pos_dims) != self.hidden_size:
            raise ValueError(f"VisionConfig.pos_dims {self.pos_dims} must sum to hidden_size {self.hidden_size}")
        if self.dim_head is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout <= 1.0 or not 0.0 <= self.emb_dropout <= 1.0:
            raise ValueError("VisionConfig dropout rates must lie in [0, 1]")

    @property
    def inner_dim(self) -> int:
        """Attention width ``num_heads * dim_head`` (512 in RadFM's 768-wide ViT)."""
        return self.num_heads * (self.dim_head or self.hidden_size // self.num_heads)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch ``C * ph * pw * pd``."""
        ph, pw, pd = self.patch_size
        return self.in_channels * ph * pw * pd

    def grid(self, spatial_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Patch grid ``(nh, nw, nd)`` for a volume of ``spatial_size`` voxels (must divide exactly)."""
        out = []
        for axis, (size, patch) in enumerate(zip(spatial_size, self.patch_size)):
            if size % patch:
                raise ValueError(
                    f"volume size {tuple(spatial_size)} is not divisible by patch size {self.patch_size} (axis {axis})"
                )
            out.append(size // patch)
        return tuple(out)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        extra = data.pop("extra")
        for key in ("patch_size", "pos_table", "pos_dims"):
            data[key] = list(data[key])
        data.update(extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | VisionConfig | None) -> VisionConfig:
        if isinstance(data, VisionConfig):
            return data
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names and k != "extra"}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)


def strided_position_index(n: int, table: int, device: torch.device | None = None) -> torch.Tensor:
    """RadFM's strided lookup into a table of ``table`` rows for ``n`` patches: ``(arange(n)+1)*(table//n) - 1``.

    E.g. table 16: n=16 -> 0..15; n=8 -> 1,3,...,15. table 128, n=1 -> 127. Requires ``1 <= n <= table``.
    """
    if n < 1 or n > table:
        raise ValueError(f"{n} patches along an axis do not fit a position table of {table} rows")
    return (torch.arange(n, device=device) + 1) * (table // n) - 1


class PatchEmbedding3D(nn.Module):
    """``(B, C, H, W, D)`` -> ``(B, nh*nw*nd, hidden)``: flatten ``b c (h p1) (w p2) (d pd) -> b (h w d) (p1 p2 pd c)``
    (RadFM and MONAI ``perceptron`` order), then ``[LayerNorm] -> Linear -> [LayerNorm]``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.norm_in = nn.LayerNorm(config.patch_dim) if config.patch_norm else nn.Identity()
        self.proj = nn.Linear(config.patch_dim, config.hidden_size)
        self.norm_out = nn.LayerNorm(config.hidden_size) if config.patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        b, c, h, w, d = x.shape
        ph, pw, pd = self.patch_size
        if h % ph or w % pw or d % pd:
            raise ValueError(f"volume {tuple(x.shape[2:])} is not divisible by patch size {self.patch_size}")
        nh, nw, nd = h // ph, w // pw, d // pd
        x = x.reshape(b, c, nh, ph, nw, pw, nd, pd).permute(0, 2, 4, 6, 3, 5, 7, 1)  # b h w d p1 p2 pd c
        x = x.reshape(b, nh * nw * nd, ph * pw * pd * c)
        return self.norm_out(self.proj(self.norm_in(x))), (nh, nw, nd)


class FactorisedPositionEmbedding3D(nn.Module):
    """Learned 3D position table factorised per axis (RadFM ``PositionEmbeddingLearned3d``).

    Tables ``row_embed (table_h, dim_h)``, ``col_embed (table_w, dim_w)``, ``dep_embed (table_d, dim_d)``;
    a grid ``(nh, nw, nd)`` reads rows with :func:`strided_position_index` and concatenates row|col|depth
    -> ``(nh*nw*nd, dim_h+dim_w+dim_d)`` in ``(h w d)`` order.
    """

    def __init__(self, table: tuple[int, int, int], dims: tuple[int, int, int]) -> None:
        super().__init__()
        self.table = tuple(table)
        self.row_embed = nn.Embedding(table[0], dims[0])
        self.col_embed = nn.Embedding(table[1], dims[1])
        self.dep_embed = nn.Embedding(table[2], dims[2])
        for emb in (self.row_embed, self.col_embed, self.dep_embed):
            nn.init.uniform_(emb.weight)  # as DETR/RadFM learned position tables

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        nh, nw, nd = grid
        device = self.row_embed.weight.device
        rows = self.row_embed(strided_position_index(nh, self.table[0], device))  # (nh, dh)
        cols = self.col_embed(strided_position_index(nw, self.table[1], device))  # (nw, dw)
        deps = self.dep_embed(strided_position_index(nd, self.table[2], device))  # (nd, dd)
        pos = torch.cat(
            [
                rows[:, None, None, :].expand(nh, nw, nd, -1),
                cols[None, :, None, :].expand(nh, nw, nd, -1),
                deps[None, None, :, :].expand(nh, nw, nd, -1),
            ],
            dim=-1,
        )
        return pos.reshape(nh * nw * nd, -1)


class SDPASelfAttention(SABlock):
    """MONAI ``SABlock`` (same parameters: ``qkv``, ``out_proj``; ``dim_head`` gives inner != hidden) whose
    forward always uses ``torch.nn.functional.scaled_dot_product_attention``.

    Why a subclass: MONAI 1.6.1's ``SABlock(use_flash_attention=True)`` passes ``dropout_p=dropout_rate`` to SDPA
    also in ``eval()`` mode (non-deterministic inference with RadFM's dropout 0.1), and ``TransformerBlock`` does
    not forward ``dim_head`` (RadFM needs inner width 512 in a 768-wide ViT). ``(B, L, hidden) -> (B, L, hidden)``.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4)  # 3 b l n d
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=attn_mask,
            dropout_p=self.dropout_rate if self.training else 0.0, scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(b, n, self.inner_dim)
        return self.drop_output(self.out_proj(out))


class ViTBlock3D(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (MONAI ``TransformerBlock``
    layout and names; MONAI ``MLPBlock`` = Linear-GELU-Dropout-Linear-Dropout)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = SDPASelfAttention(
            config.hidden_size, config.num_heads, config.dropout, qkv_bias=config.qkv_bias,
            dim_head=config.dim_head, use_combined_linear=True, use_flash_attention=True,
        )
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = MLPBlock(config.hidden_size, config.mlp_dim, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer3D(nn.Module):
    """3D ViT: ``(B, C, H, W, D)`` in ``[0, 1]`` -> tokens ``(B, (H/ph)(W/pw)(D/pd), hidden)``.

    No CLS token. Patch stem -> + factorised position table -> dropout -> blocks -> optional final LayerNorm.
    """

    def __init__(self, config: VisionConfig | dict[str, Any]) -> None:
        super().__init__()
        config = VisionConfig.from_dict(config)
        self.config = config
        self.patch_embedding = PatchEmbedding3D(config)
        self.pos_embedding = FactorisedPositionEmbedding3D(config.pos_table, config.pos_dims)  # type: ignore[arg-type]
        self.emb_dropout = nn.Dropout(config.emb_dropout)
        self.blocks = nn.ModuleList(ViTBlock3D(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.hidden_size) if config.final_norm else nn.Identity()
        self.gradient_checkpointing = config.gradient_checkpointing

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (saves activation memory when training)."""
        self.gradient_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 5 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected pixel_values (B, {self.config.in_channels}, H, W, D), got {tuple(pixel_values.shape)}"
            )
        x, grid = self.patch_embedding(pixel_values)
        x = self.emb_dropout(x + self.pos_embedding(grid).to(x.dtype))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.final_norm(x)
