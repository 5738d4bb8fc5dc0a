"""Decode a large latent in overlapping tiles with feathered seams and bounded memory.

The autoencoders' decoders use GroupNorm, whose statistics are taken over the whole input, so
tiles decoded on their own differ from the whole decode. Given the decoder module, decoding runs
twice: the first pass collects every GroupNorm's mean and mean square over all tiles, the second
normalises every tile with these shared statistics (close to the whole image's; exact up to the
first pass's own per-tile normalisation); overlapping tiles blended with linear ramps hide the
rest (see ``tests/test_sample_large.py`` for the tolerance). A latent that fits in one tile is
decoded whole, exactly as ``decode_first_stage`` does.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ldm.models.diffusion.multidiffusion import axis_starts


def ramp(length: int, fade: int, start_edge: bool = False, end_edge: bool = False
         ) -> torch.Tensor:
    """1-D tile weights: 0 over the first quarter of ``fade`` pixels, then rising to 1.

    The pixels nearest a tile's inner side see the decoder's zero padding, so they get no
    weight; the neighbour tile covers them (its own weight there is positive). Sides on the
    canvas edge (``start_edge``/``end_edge``) keep weight 1.
    """
    p = torch.arange(length, dtype=torch.float32)
    if fade <= 0:
        return torch.ones(length)
    margin = (fade - 1) // 4

    def rise(d: torch.Tensor) -> torch.Tensor:
        return torch.clamp((d - margin + 1) / (fade - 2 * margin), 0.0, 1.0)

    w = torch.ones(length)
    if not start_edge:
        w = torch.minimum(w, rise(p))
    if not end_edge:
        w = torch.minimum(w, rise(length - 1 - p))
    return w


class SharedGroupNorm:
    """Make every GroupNorm of a module collect statistics over calls, or normalise with them."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.sums: dict[int, list[torch.Tensor]] = {}

    @contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        """``collect`` (normal GroupNorm, statistics summed) or ``apply`` (shared statistics)."""
        if any("forward" in vars(m) for m in self.norms):
            raise RuntimeError("the decoder's GroupNorms are already patched")
        try:
            for m in self.norms:
                m.forward = self._collect(m) if mode == "collect" else self._apply(m)
            yield
        finally:
            for m in self.norms:
                vars(m).pop("forward", None)  # back to the class's forward

    def _collect(self, m: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        """GroupNorm as usual, adding each group's sum, sum of squares and count."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            g = x.reshape(x.shape[0], m.num_groups, -1).double()
            acc = self.sums.setdefault(id(m), [0.0, 0.0, 0])
            acc[0] = acc[0] + g.sum(-1)
            acc[1] = acc[1] + (g * g).sum(-1)
            acc[2] += g.shape[-1]
            return nn.functional.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
        return forward

    def _apply(self, m: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        """GroupNorm with the collected mean and variance instead of the input's own."""
        s1, s2, n = self.sums[id(m)]
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp(min=0).add(m.eps).sqrt()

        def forward(x: torch.Tensor) -> torch.Tensor:
            g = x.reshape(x.shape[0], m.num_groups, -1)
            y = ((g - mean[..., None].to(x.dtype)) / std[..., None].to(x.dtype)).reshape(x.shape)
            if m.affine:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                y = y * m.weight.reshape(shape) + m.bias.reshape(shape)
            return y
        return forward


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int,
                 tile: int = 64, overlap: int = 16,
                 norm_module: nn.Module | None = None) -> torch.Tensor:
    """``decode(z)`` of a ``(1, C, h, w)`` latent in ``tile``-pixel latent tiles.

    ``factor`` is the decoder's upsampling (pixels per latent pixel); tiles share ``overlap``
    latent pixels and are blended with linear ramps over the shared part. With
    ``norm_module`` (the decoder), its GroupNorms use statistics shared by all tiles (two
    passes). Memory: the output image plus one tile's decode.
    """
    if z.shape[0] != 1:
        raise ValueError(f"decode one latent (1, C, h, w) at a time, got {tuple(z.shape)}")
    h, w = z.shape[2], z.shape[3]
    if h <= tile and w <= tile:
        return decode(z)
    if not 0 <= overlap < tile:
        raise ValueError(f"decode overlap {overlap} must be in [0, tile {tile})")
    th, tw = min(tile, h), min(tile, w)
    boxes = [(y, x) for y in axis_starts(h, th, overlap) for x in axis_starts(w, tw, overlap)]
    if norm_module is not None:
        shared = SharedGroupNorm(norm_module)
        with shared.mode("collect"):
            for y, x in boxes:
                decode(z[:, :, y:y + th, x:x + tw])
        with shared.mode("apply"):
            return _blend(decode, z, boxes, th, tw, factor, overlap)
    return _blend(decode, z, boxes, th, tw, factor, overlap)


def _blend(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
           boxes: list[tuple[int, int]], th: int, tw: int, factor: int,
           overlap: int) -> torch.Tensor:
    """Decode every ``(top, left)`` tile and blend them with linear ramps."""
    h, w = z.shape[2], z.shape[3]
    fade = overlap * factor
    out = total = None
    for y, x in boxes:
        weight = torch.outer(ramp(th * factor, fade, y == 0, y + th == h),
                             ramp(tw * factor, fade, x == 0, x + tw == w)).to(z.device)
        img = decode(z[:, :, y:y + th, x:x + tw]).float()
        if out is None:
            out = torch.zeros((1, img.shape[1], h * factor, w * factor), device=z.device)
            total = torch.zeros((h * factor, w * factor), device=z.device)
        py, px = y * factor, x * factor
        out[..., py:py + th * factor, px:px + tw * factor] += weight * img
        total[py:py + th * factor, px:px + tw * factor] += weight
    return out / total
