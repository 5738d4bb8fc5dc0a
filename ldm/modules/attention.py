"""Cross-attention transformer blocks of the latent-diffusion U-Net (CompVis key layout).

Attention runs on ``torch.nn.functional.scaled_dot_product_attention`` so fused kernels are used
where available and the full attention matrix is never materialised by this code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


def Normalize(in_channels: int) -> nn.GroupNorm:  # noqa: N802 (CompVis name)
    """GroupNorm(32) with eps 1e-6, as in the CompVis spatial transformer and autoencoder."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class GEGLU(nn.Module):
    """Gated GELU projection: ``x * gelu(gate)`` with ``x, gate = proj(x).chunk(2)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP; ``net.0`` is GEGLU (or Linear+GELU), ``net.2`` the output projection."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = (GEGLU(dim, inner_dim) if glu
                      else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()))
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _additive_mask(mask: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """Boolean key mask ``(B, ...)`` (True = attend) -> additive bias ``(B, 1, 1, J)``.

    CompVis fills masked logits with ``-finfo.max`` rather than ``-inf``, so a fully masked row
    attends uniformly instead of producing NaN; an additive bias keeps that behaviour.
    """
    keep = mask.reshape(batch, -1).to(torch.bool)
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias.masked_fill_(~keep, -torch.finfo(dtype).max)
    return bias[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention; self-attention when no context is given."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        # (B, N, H*D) -> (B, H, N, D) as views; SDPA takes the strided layout without copies.
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        attn_mask = None if mask is None else _additive_mask(mask, b, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU MLP, each pre-normed with a residual."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: int | None = None, gated_ff: bool = True,
                 checkpoint: bool = True) -> None:
        super().__init__()
        # Registration order fixes the state_dict order (ff before attn2), as in CompVis.
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads,
                                    dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a token sequence.

    ``norm`` -> 1x1 ``proj_in`` -> tokens ``(B, H*W, C)`` -> transformer blocks -> 1x1
    ``proj_out`` (zero-initialised) -> residual.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 dropout: float = 0.0, context_dim: int | None = None,
                 use_checkpoint: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout,
                                  context_dim=context_dim, checkpoint=use_checkpoint)
            for _ in range(depth)
        ])
        self.proj_out = zero_module(
            nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2).contiguous()
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        # proj_out is a 1x1 conv; applying it as a matmul on the token layout and reading the
        # result transposed inside the residual add avoids materialising a transposed copy.
        weight = self.proj_out.weight.flatten(1)
        out = F.linear(tokens, weight, self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)
