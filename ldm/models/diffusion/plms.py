"""PLMS sampling (pseudo linear multi-step, Liu et al. 2022) with the CompVis ``PLMSSampler``
interface, built on the DDIM schedule and update of :mod:`ldm.models.diffusion.ddim`."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import (
    Cond,
    DDIMSampler,
    DDIMSchedule,
    Denoiser,
    _check_batch,
    ddim_step,
    guided_eps,
    model_denoiser,
)
from ldm.models.diffusion.schedule import noise_like

logger = logging.getLogger(__name__)

# CompVis sampler arguments accepted at their no-op values only
_NO_OPS = {"normals_sequence": None, "quantize_x0": False, "mask": None, "x0": None,
           "temperature": 1.0, "noise_dropout": 0.0, "ddim_discretize": "uniform"}


def plms_eps(e_t: torch.Tensor, old_eps: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current and up to three previous noise predictions."""
    if len(old_eps) == 1:
        return (3 * e_t - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


def sample_plms(denoiser: Denoiser, x_T: torch.Tensor, sched: DDIMSchedule, cond: Cond = None,
                uncond: Cond | None = None, scale: float = 1.0, uncond_separate: bool = False,
                log_every_t: int = 100, callback: Callable[[int], None] | None = None,
                img_callback: Callable[[torch.Tensor, int], None] | None = None,
                progress: bool = False) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Run PLMS from ``x_T`` (the first step is a pseudo improved-Euler step, as CompVis)."""
    img, b, device = x_T, x_T.shape[0], x_T.device
    intermediates = {"x_inter": [img], "pred_x0": [img]}
    time_range = np.flip(sched.timesteps)
    total = len(sched)
    old_eps: list[torch.Tensor] = []

    def eps(x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        return guided_eps(denoiser, x, ts, cond, uncond, scale, uncond_separate)

    def step(x: torch.Tensor, e: torch.Tensor, index: int):
        # one noise draw per update, as the reference (sigma is 0: PLMS needs eta = 0)
        return ddim_step(x, e, *sched.coefficients(index, b, device), noise_like(x.shape, device))

    for i, t in enumerate(tqdm(time_range, desc="PLMS Sampler", total=total, disable=not progress)):
        index = total - i - 1
        ts = torch.full((b,), int(t), device=device, dtype=torch.long)
        t_next = int(time_range[min(i + 1, len(time_range) - 1)])
        e_t = eps(img, ts)
        if not old_eps:
            x_prev, _ = step(img, e_t, index)
            e_next = eps(x_prev, torch.full((b,), t_next, device=device, dtype=torch.long))
            e_prime = (e_t + e_next) / 2
        else:
            e_prime = plms_eps(e_t, old_eps)
        img, pred_x0 = step(img, e_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
        if callback is not None:
            callback(i)
        if img_callback is not None:
            img_callback(pred_x0, i)
        if index % log_every_t == 0 or index == total - 1:
            intermediates["x_inter"].append(img)
            intermediates["pred_x0"].append(pred_x0)
    return img, intermediates


class PLMSSampler(DDIMSampler):
    """CompVis ``PLMSSampler``: ``PLMSSampler(model).sample(S, batch_size, shape, ...)``."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform",
                      ddim_eta: float = 0.0, verbose: bool = True) -> None:
        """DDIM schedule with eta = 0 (PLMS is deterministic)."""
        if ddim_eta != 0:
            raise ValueError(f"PLMS sampling needs eta=0, got {ddim_eta}")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int] | list[int],
               conditioning: Cond = None, callback: Callable | None = None,
               img_callback: Callable | None = None, eta: float = 0.0, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Cond | None = None,
               score_corrector: Any = None, corrector_kwargs: Mapping | None = None,
               use_tqdm: bool | None = None, sample_uncond_separate: bool = False,
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Draw ``batch_size`` samples of ``shape`` (C, H, W) with ``S`` PLMS steps."""
        unsupported = sorted(k for k, v in kwargs.items()
                             if k not in _NO_OPS or torch.is_tensor(v) or v != _NO_OPS[k])
        if unsupported:
            raise ValueError(f"PLMSSampler.sample does not support {unsupported}")
        _check_batch(conditioning, batch_size)
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        img = torch.randn(size, device=self.device) if x_T is None else x_T.to(self.device)
        return sample_plms(model_denoiser(self.model, score_corrector, corrector_kwargs), img,
                           self.ddim, conditioning, unconditional_conditioning,
                           unconditional_guidance_scale, sample_uncond_separate, log_every_t,
                           callback, img_callback, progress=verbose if use_tqdm is None
                           else use_tqdm)
