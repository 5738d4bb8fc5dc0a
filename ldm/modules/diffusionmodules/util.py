"""Network building blocks shared by the diffusion U-Net (CompVis ``diffusionmodules.util``).

Schedule math lives in :mod:`ldm.models.diffusion.schedule`; this module only holds layers and
helpers whose numerics the U-Net checkpoints depend on.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def _needs_grad(inputs: Sequence[Any], params: Iterable[torch.Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(torch.is_tensor(t) and t.requires_grad for t in inputs):
        return True
    return any(p.requires_grad for p in params)


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any],
               params: Iterable[torch.Tensor], flag: bool) -> Any:
    """Run ``func(*inputs)``, recomputing its activations in backward when ``flag`` is set.

    Same call signature as CompVis; it uses PyTorch's non-reentrant checkpoint, which restores
    the autocast and RNG state on recomputation and tracks ``params`` by itself. Nothing is
    recomputed when no gradient will be taken (``no_grad``, inference, frozen inputs).
    """
    if flag and _needs_grad(inputs, params):
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal ``[cos, sin]`` embedding of (possibly fractional) timesteps: ``(N, dim)``."""
    if repeat_only:
        return timesteps[:, None].expand(-1, dim).clone()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scale the parameters of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (also under autocast), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The U-Net's standard normalization: 32-group float32 GroupNorm, eps 1e-5."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """A linear layer."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D average pooling layer."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
