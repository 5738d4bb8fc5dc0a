"""Joint DDIM over a latent canvas larger than the model's window (MultiDiffusion).

Bar-Tal et al. 2023, in its training-free form: at every DDIM step the canvas is covered by
overlapping square windows of the model's latent size, the denoiser runs on the windows in
batches (with classifier-free guidance), the noise predictions are averaged where windows
overlap, and one DDIM update (:func:`ldm.models.diffusion.ddim.ddim_step`) moves the whole
canvas. Plain functions of a denoiser ``eps = denoiser(x, t, cond)``, as in ``ddim.py``.

The average is a convex combination with weights ``w_i / sum_j w_j`` accumulated in float64
and rounded once to float32: where one window covers a position its weight is exactly 1, so a
canvas of one window reproduces plain DDIM bit for bit, and where all windows predict the same
value the average is exactly that value.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import Cond, DDIMSchedule, Denoiser, ddim_step, guided_eps
from ldm.models.diffusion.schedule import noise_like

WEIGHTINGS = ("uniform", "gaussian")
# Gaussian window weights: variance as a fraction of the window size squared (Mixture of
# Diffusers, Jimenez 2023), so a window's border counts little next to another's centre.
GAUSSIAN_VARIANCE = 0.01

Window = tuple[int, int]  # (top, left) in latent pixels


def overlap_pixels(overlap: float, window: int) -> int:
    """Overlap in latent pixels: a fraction of the window when below 1, else a pixel count."""
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    px = int(round(overlap * window)) if overlap < 1 else int(overlap)
    if overlap >= 1 and overlap != int(overlap):
        raise ValueError(f"overlap {overlap}: give a fraction below 1 or whole latent pixels")
    if px >= window:
        raise ValueError(f"overlap of {px} latent pixels leaves no stride in a {window}-pixel "
                         "window; use less than the window")
    return px


def axis_starts(length: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis: at least ``overlap`` shared, first at 0, last at the end."""
    if length < window:
        raise ValueError(f"canvas of {length} latent pixels is smaller than the {window}-pixel "
                         "window")
    if length == window:
        return [0]
    n = math.ceil((length - window) / (window - overlap)) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def window_grid(height: int, width: int, window: int, overlap: int) -> list[Window]:
    """``(top, left)`` of every window covering a ``height`` x ``width`` latent, row-major."""
    return [(y, x) for y in axis_starts(height, window, overlap)
            for x in axis_starts(width, window, overlap)]


def window_weights(window: int, weighting: str = "uniform") -> torch.Tensor:
    """Per-pixel weight of a window, float64 ``(window, window)``, all positive."""
    if weighting == "uniform":
        return torch.ones(window, window, dtype=torch.float64)
    if weighting == "gaussian":
        mid = (window - 1) / 2
        x = torch.arange(window, dtype=torch.float64)
        g = torch.exp(-((x - mid) ** 2) / (window ** 2) / (2 * GAUSSIAN_VARIANCE))
        return torch.outer(g, g)
    raise ValueError(f"window weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def weight_total(height: int, width: int, windows: Sequence[Window],
                 weights: torch.Tensor) -> torch.Tensor:
    """Sum of the window weights at each canvas position, float64 ``(height, width)``."""
    window = weights.shape[0]
    total = torch.zeros(height, width, dtype=torch.float64)
    for y, x in windows:
        total[y:y + window, x:x + window] += weights
    if not bool((total > 0).all()):
        raise ValueError("the windows do not cover the canvas")
    return total


def batch_cond(parts: Sequence[Cond]) -> Cond:
    """Concatenate per-window conditionings (tensors, lists or dicts of them) along the batch."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, Mapping):
        return {k: batch_cond([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return [batch_cond([p[i] for p in parts]) for i in range(len(first))]
    return torch.cat(list(parts))


def blend_cond(parts: Sequence[Cond], weights: Sequence[float]) -> Cond:
    """``sum(w * c)`` of conditionings of one structure (tensors, lists or dicts of them)."""
    first = parts[0]
    if isinstance(first, Mapping):
        return {k: blend_cond([p[k] for p in parts], weights) for k in first}
    if isinstance(first, (list, tuple)):
        return [blend_cond([p[i] for p in parts], weights) for i in range(len(first))]
    return sum(w * p for w, p in zip(weights, parts))


class WindowAverager:
    """Weighted average of window predictions over a canvas (float64 sum, float32 result)."""

    def __init__(self, height: int, width: int, windows: Sequence[Window], window: int,
                 weighting: str = "uniform", device: torch.device | str = "cpu") -> None:
        if not windows:
            raise ValueError("no windows")
        self.window = window
        weights = window_weights(window, weighting)
        self.total = weight_total(height, width, windows, weights).to(device)
        self.weights = weights.to(device)

    def average(self, shape: Sequence[int],
                predictions: Callable[[], Any]) -> torch.Tensor:
        """Average of ``(window, prediction)`` pairs yielded by ``predictions()``, float32."""
        acc = torch.zeros(tuple(shape), dtype=torch.float64, device=self.total.device)
        w = self.window
        for (y, x), pred in predictions():
            share = self.weights / self.total[y:y + w, x:x + w]
            acc[..., y:y + w, x:x + w] += share * pred.to(torch.float64)
        return acc.to(torch.float32)


def joint_eps(denoiser: Denoiser, x: torch.Tensor, step: int, windows: Sequence[Window],
              averager: WindowAverager, cond_for: Callable[[Sequence[int]], Cond],
              uncond_for: Callable[[int], Cond] | None = None, scale: float = 1.0,
              batch: int = 8) -> torch.Tensor:
    """Noise prediction of the canvas ``x`` (1, C, H, W): guided window predictions, averaged."""
    w = averager.window

    def predictions() -> Any:
        """``(window, eps)`` of every window, ``batch`` windows per denoiser call."""
        for start in range(0, len(windows), batch):
            idx = list(range(start, min(start + batch, len(windows))))
            xs = torch.cat([x[:, :, y:y + w, c:c + w] for y, c in (windows[i] for i in idx)])
            ts = torch.full((len(idx),), int(step), device=x.device, dtype=torch.long)
            uc = uncond_for(len(idx)) if uncond_for is not None else None
            eps = guided_eps(denoiser, xs, ts, cond_for(idx), uc, scale)
            for k, i in enumerate(idx):
                yield windows[i], eps[k:k + 1]

    return averager.average(x.shape, predictions)


def sample_canvas(denoiser: Denoiser, x_T: torch.Tensor, sched: DDIMSchedule,
                  windows: Sequence[Window], window: int, cond_for: Callable[[Sequence[int]], Cond],
                  uncond_for: Callable[[int], Cond] | None = None, scale: float = 1.0,
                  weighting: str = "uniform", batch: int = 8,
                  callback: Callable[[int], None] | None = None,
                  progress: bool = True) -> torch.Tensor:
    """Joint DDIM of the canvas ``x_T`` (1, C, H, W) through ``sched`` (high to low noise).

    ``cond_for(window indices)`` gives the batched conditioning of those windows and
    ``uncond_for(n)`` the unconditional one of ``n`` windows. One ``randn`` of the canvas's
    shape is drawn per step, as :func:`ldm.models.diffusion.ddim.sample_ddim` does.
    """
    if x_T.shape[0] != 1:
        raise ValueError(f"the canvas is one latent (1, C, H, W), got shape {tuple(x_T.shape)}")
    img, device = x_T, x_T.device
    averager = WindowAverager(img.shape[2], img.shape[3], windows, window, weighting, device)
    total = len(sched)
    for i, step in enumerate(tqdm(np.flip(sched.timesteps), desc="DDIM (canvas)", total=total,
                                  disable=not progress, unit="step")):
        index = total - i - 1
        e_t = joint_eps(denoiser, img, int(step), windows, averager, cond_for, uncond_for,
                        scale, batch)
        a_t, a_prev, sigma_t, sqrt_one_minus_at = sched.coefficients(index, 1, device)
        noise = noise_like(img.shape, device)
        img, _ = ddim_step(img, e_t, a_t, a_prev, sigma_t, sqrt_one_minus_at, noise)
        if callback is not None:
            callback(i)
    return img
