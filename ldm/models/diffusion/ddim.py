"""DDIM sampling (Song et al. 2021) with the CompVis ``DDIMSampler`` interface.

The math lives in plain functions of a *denoiser* ``eps = denoiser(x, t, cond)`` (no Lightning,
no model internals), in the style of k-diffusion; :class:`DDIMSampler` adapts a
``LatentDiffusion``/``DDPM`` to them. Results match CompVis latent-diffusion / PathLDM: the
per-step coefficients keep the reference's float32/float64 rounding, classifier-free guidance
batches ``cat([uc, c])`` and one ``randn(x.shape)`` is drawn per step even when eta = 0.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.schedule import (
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    noise_like,
    predict_eps_from_start,
    sqrt_one_minus,
)

logger = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Cond = Any  # a tensor, a list of tensors, or a dict of either (hybrid conditioning)


@dataclass
class DDIMSchedule:
    """DDIM timesteps and coefficients, with the reference's types (see ``schedule.py``)."""

    timesteps: np.ndarray  # int64, ascending
    alphas: torch.Tensor  # float32
    alphas_prev: np.ndarray  # float64
    sigmas: torch.Tensor  # float64
    sqrt_one_minus_alphas: torch.Tensor  # float32

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor, num_steps: int, eta: float = 0.0,
             discretize: str = "uniform", verbose: bool = False) -> DDIMSchedule:
        """Build for a DDPM with ``alphas_cumprod`` and ``num_steps`` DDIM steps."""
        steps = make_ddim_timesteps(discretize, num_steps, alphas_cumprod.shape[0], verbose)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            alphas_cumprod, steps, eta, verbose)
        return cls(steps, alphas, alphas_prev, sigmas, sqrt_one_minus(alphas))

    def __len__(self) -> int:
        return len(self.timesteps)

    def coefficients(self, index: int, b: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a_t, a_prev, sigma_t, sqrt(1 - a_t))`` for step ``index`` as float32 ``(b,1,1,1)``."""
        # float() of the float32/float64 entries then a float32 fill rounds exactly as the
        # reference's torch.full((b, 1, 1, 1), value)
        def full(v: Any) -> torch.Tensor:
            return torch.full((b, 1, 1, 1), float(v), device=device, dtype=torch.float32)

        return (full(self.alphas[index]), full(self.alphas_prev[index]),
                full(self.sigmas[index]), full(self.sqrt_one_minus_alphas[index]))


def cat_conds(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings (tensors, lists or dicts of them) along the batch, in order."""
    first = conds[0]
    if isinstance(first, Mapping):
        return {k: cat_conds([c[k] for c in conds]) for k in first}
    if isinstance(first, (list, tuple)):
        return [cat_conds([c[i] for c in conds]) for i in range(len(first))]
    return torch.cat(list(conds))


def cat_cond(uc: Cond, c: Cond) -> Cond:
    """Concatenate unconditional and conditional inputs along the batch, ``[uc, c]``."""
    return cat_conds([uc, c])


def chained_eps(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, conds: Sequence[Cond],
                scales: Sequence[float]) -> torch.Tensor:
    """Guidance one conditioning at a time: ``e_0 + sum_k scales[k-1] * (e_k - e_(k-1))``.

    ``conds[0]`` is the most unconditional branch and each next one adds a conditioning (e.g.
    ``[uncond, levels only, levels + text]`` gives ``e_uu + s_l (e_lu - e_uu) + s_t (e_lt -
    e_lu)``); one batched forward. Two conditionings are ordinary classifier-free guidance.
    """
    if len(scales) != len(conds) - 1:
        raise ValueError(f"{len(conds)} conditionings need {len(conds) - 1} scales, "
                         f"got {len(scales)}")
    n = len(conds)
    eps = denoiser(torch.cat([x] * n), torch.cat([t] * n), cat_conds(conds)).chunk(n)
    out = eps[0]
    for k, scale in enumerate(scales, start=1):
        out = out + scale * (eps[k] - eps[k - 1])
    return out


def guided_eps(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond,
               uncond: Cond | None = None, scale: float = 1.0,
               uncond_separate: bool = False) -> torch.Tensor:
    """Noise prediction with classifier-free guidance ``e_u + scale * (e_c - e_u)``.

    Guidance is skipped when ``scale == 1`` or ``uncond`` is None. By default the two branches
    run as one batch ``cat([uncond, cond])`` (the reference's order); ``uncond_separate`` runs
    two forwards of the original batch size to save memory.
    """
    if uncond is None or scale == 1.0:
        return denoiser(x, t, cond)
    if uncond_separate:
        e_t = denoiser(x, t, cond)
        e_t_uncond = denoiser(x, t, uncond)
    else:
        out = denoiser(torch.cat([x] * 2), torch.cat([t] * 2), cat_cond(uncond, cond))
        e_t_uncond, e_t = out.chunk(2)
    return e_t_uncond + scale * (e_t - e_t_uncond)


def ddim_step(x: torch.Tensor, e_t: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
              sigma_t: torch.Tensor, sqrt_one_minus_at: torch.Tensor, noise: torch.Tensor,
              temperature: float = 1.0, noise_dropout: float = 0.0,
              denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update; returns ``(x_prev, pred_x0)``.

    ``x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise``.
    """
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    if denoised_fn is not None:
        pred_x0 = denoised_fn(pred_x0)
    dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
    noise = sigma_t * noise * temperature
    if noise_dropout > 0.0:
        noise = torch.nn.functional.dropout(noise, p=noise_dropout)
    return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0


def sample_ddim(denoiser: Denoiser, x_T: torch.Tensor, sched: DDIMSchedule, cond: Cond = None,
                uncond: Cond | None = None, scale: float = 1.0, uncond_separate: bool = False,
                log_every_t: int = 100, temperature: float = 1.0, noise_dropout: float = 0.0,
                denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                inpaint: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                callback: Callable[[int], None] | None = None,
                img_callback: Callable[[torch.Tensor, int], None] | None = None,
                progress: bool = False) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Run DDIM from ``x_T`` through ``sched`` (high to low noise).

    Returns the final sample and ``{"x_inter": [...], "pred_x0": [...]}`` holding ``x_T`` and
    every step whose index is a multiple of ``log_every_t`` (plus the first step).
    ``inpaint(img, ts)`` may replace known regions before each step.
    """
    img, b, device = x_T, x_T.shape[0], x_T.device
    intermediates = {"x_inter": [img], "pred_x0": [img]}
    total = len(sched)
    steps = np.flip(sched.timesteps)
    for i, step in enumerate(tqdm(steps, desc="DDIM Sampler", total=total, disable=not progress)):
        index = total - i - 1
        ts = torch.full((b,), int(step), device=device, dtype=torch.long)
        if inpaint is not None:
            img = inpaint(img, ts)
        e_t = guided_eps(denoiser, img, ts, cond, uncond, scale, uncond_separate)
        a_t, a_prev, sigma_t, sqrt_one_minus_at = sched.coefficients(index, b, device)
        # One standard-normal draw per step even when sigma_t = 0 (eta = 0), so the global RNG
        # stream, and hence any later draw, matches CompVis/PathLDM exactly.
        noise = noise_like(img.shape, device)
        img, pred_x0 = ddim_step(img, e_t, a_t, a_prev, sigma_t, sqrt_one_minus_at, noise,
                                 temperature, noise_dropout, denoised_fn)
        if callback is not None:
            callback(i)
        if img_callback is not None:
            img_callback(pred_x0, i)
        if index % log_every_t == 0 or index == total - 1:
            intermediates["x_inter"].append(img)
            intermediates["pred_x0"].append(pred_x0)
    return img, intermediates


def _check_batch(conditioning: Cond, batch_size: int) -> None:
    if conditioning is None:
        return
    if isinstance(conditioning, Mapping):
        conditioning = next(iter(conditioning.values()))
    if isinstance(conditioning, (list, tuple)):
        conditioning = conditioning[0]
    if hasattr(conditioning, "shape") and conditioning.shape[0] != batch_size:
        logger.warning("got %d conditionings but batch size is %d",
                       conditioning.shape[0], batch_size)


def model_denoiser(model: Any, score_corrector: Any = None,
                   corrector_kwargs: Mapping | None = None) -> Denoiser:
    """Wrap a ``LatentDiffusion``'s ``apply_model`` as an eps-predicting denoiser."""
    def denoise(x: torch.Tensor, t: torch.Tensor, c: Cond) -> torch.Tensor:
        out = model.apply_model(x, t, c)
        if getattr(model, "parameterization", "eps") == "x0":
            out = predict_eps_from_start(model, x, t, out)
        if score_corrector is not None:
            out = score_corrector.modify_score(model, out, x, t, c, **(corrector_kwargs or {}))
        return out

    return denoise


def _chained(denoiser: Denoiser, conds: Sequence[Cond], scales: Sequence[float]) -> Denoiser:
    """A denoiser that ignores its conditioning and applies :func:`chained_eps` over ``conds``."""
    def denoise(x: torch.Tensor, t: torch.Tensor, c: Cond) -> torch.Tensor:
        return chained_eps(denoiser, x, t, conds, scales)

    return denoise


class DDIMSampler:
    """CompVis ``DDIMSampler``: ``DDIMSampler(model).sample(S, batch_size, shape, ...)``.

    Works on the model's device (CPU, CUDA, ...). ``model`` must provide ``apply_model``,
    ``alphas_cumprod`` and ``num_timesteps`` (and ``q_sample`` for inpainting with ``mask``).
    """

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.ddim: DDIMSchedule | None = None

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform",
                      ddim_eta: float = 0.0, verbose: bool = True) -> None:
        """Compute the DDIM timesteps and coefficients (``ddim_timesteps``, ``ddim_alphas``...)."""
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("alphas_cumprod must be defined for each of the "
                             f"{self.ddpm_num_timesteps} timesteps")
        self.ddim = DDIMSchedule.make(alphas_cumprod, ddim_num_steps, ddim_eta,
                                      ddim_discretize, verbose)
        self.ddim_timesteps = self.ddim.timesteps
        self.ddim_alphas = self.ddim.alphas
        self.ddim_alphas_prev = self.ddim.alphas_prev
        self.ddim_sigmas = self.ddim.sigmas
        self.ddim_sqrt_one_minus_alphas = self.ddim.sqrt_one_minus_alphas

    @property
    def device(self) -> torch.device:
        """Device of the wrapped model's schedule buffers."""
        return self.model.alphas_cumprod.device

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, int, int] | list[int],
               conditioning: Cond = None, callback: Callable | None = None,
               normals_sequence: Any = None, img_callback: Callable | None = None,
               quantize_x0: bool = False, eta: float = 0.0, mask: torch.Tensor | None = None,
               x0: torch.Tensor | None = None, temperature: float = 1.0,
               noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Mapping | None = None, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Cond | None = None, use_tqdm: bool | None = None,
               sample_uncond_separate: bool = False, ddim_discretize: str = "uniform",
               guidance_chain: Sequence[tuple[Cond, float]] | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Draw ``batch_size`` samples of ``shape`` (C, H, W) with ``S`` DDIM steps.

        Returns ``(samples, {"x_inter": [...], "pred_x0": [...]})``. ``use_tqdm`` defaults to
        ``verbose``. ``guidance_chain`` ``[(cond_1, s_1), ..., (cond_n, s_n)]`` guides one
        conditioning at a time from ``unconditional_conditioning`` (:func:`chained_eps`) in
        place of ``unconditional_guidance_scale``.
        """
        if kwargs:
            logger.warning("DDIMSampler.sample ignores unknown arguments %s", sorted(kwargs))
        _check_batch(conditioning, batch_size)
        self.make_schedule(S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        return self.ddim_sampling(
            conditioning, size, x_T=x_T, callback=callback, img_callback=img_callback,
            quantize_denoised=quantize_x0, mask=mask, x0=x0, log_every_t=log_every_t,
            temperature=temperature, noise_dropout=noise_dropout,
            score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning,
            use_tqdm=verbose if use_tqdm is None else use_tqdm,
            sample_uncond_separate=sample_uncond_separate, guidance_chain=guidance_chain)

    @torch.no_grad()
    def ddim_sampling(self, cond: Cond, shape: tuple[int, ...], x_T: torch.Tensor | None = None,
                      callback: Callable | None = None, quantize_denoised: bool = False,
                      mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                      img_callback: Callable | None = None, log_every_t: int = 100,
                      temperature: float = 1.0, noise_dropout: float = 0.0,
                      score_corrector: Any = None, corrector_kwargs: Mapping | None = None,
                      unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Cond | None = None, use_tqdm: bool = True,
                      sample_uncond_separate: bool = False,
                      guidance_chain: Sequence[tuple[Cond, float]] | None = None
                      ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sampling loop over the schedule set by :meth:`make_schedule`."""
        if self.ddim is None:
            raise RuntimeError("call make_schedule() (or sample()) before ddim_sampling()")
        img = torch.randn(shape, device=self.device) if x_T is None else x_T.to(self.device)
        inpaint = None
        if mask is not None:
            if x0 is None:
                raise ValueError("inpainting with a mask needs x0 (the known latents)")

            def inpaint(img: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
                return self.model.q_sample(x0, ts) * mask + (1.0 - mask) * img

        denoised_fn = None
        if quantize_denoised:
            def denoised_fn(pred_x0: torch.Tensor) -> torch.Tensor:
                return self.model.first_stage_model.quantize(pred_x0)[0]

        denoiser = model_denoiser(self.model, score_corrector, corrector_kwargs)
        if guidance_chain:
            if unconditional_conditioning is None:
                raise ValueError("guidance_chain starts from unconditional_conditioning; give it")
            denoiser = _chained(denoiser, [unconditional_conditioning,
                                           *(c for c, _ in guidance_chain)],
                                [s for _, s in guidance_chain])
            unconditional_conditioning, unconditional_guidance_scale = None, 1.0
        return sample_ddim(
            denoiser, img, self.ddim,
            cond, unconditional_conditioning, unconditional_guidance_scale,
            sample_uncond_separate, log_every_t, temperature, noise_dropout, denoised_fn,
            inpaint, callback, img_callback, progress=use_tqdm)
