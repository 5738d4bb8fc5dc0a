"""Gaussian-diffusion schedule and posterior math, independent of Lightning.

Everything here reproduces CompVis latent-diffusion bit for bit: betas and the derived
schedule are computed in float64 and cast once to float32, and the DDIM parameters keep the
original's mixed float32/float64 types so the per-step coefficients round identically.
Functions that need the schedule take any object exposing the buffers as attributes (a
:class:`DiffusionSchedule`, or a ``DDPM`` module).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

# The persistent schedule buffers, in CompVis registration (state_dict) order.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
PARAMETERIZATIONS = ("eps", "x0")


class ScheduleLike(Protocol):
    """Anything holding the schedule tensors as attributes (``DiffusionSchedule``, ``DDPM``)."""

    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Beta schedule as a float64 numpy array of length ``n_timestep``."""
    # torch (not numpy) float64 ops, as the reference: linspace/cos may differ by one ulp.
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep,
                               dtype=torch.float64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * np.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"beta_schedule {schedule!r} unknown; expected one of {BETA_SCHEDULES}")
    return betas.numpy()


def schedule_arrays(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """The 12 schedule arrays in float64 from ``betas`` (``v_posterior`` mixes in beta_t)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or len(betas) == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        # clipped: the posterior variance is 0 at the start of the chain
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def lvlb_weights(buffers: Mapping[str, torch.Tensor], alphas: np.ndarray,
                 parameterization: str = "eps") -> torch.Tensor:
    """VLB weights per timestep, in float32 from the float32 buffers as the reference.

    ``alphas`` is ``1 - betas`` in float64 (cast to float32 here, as the reference does).
    """
    betas, ac = buffers["betas"], buffers["alphas_cumprod"]
    if parameterization == "eps":
        alphas32 = torch.tensor(alphas, dtype=torch.float32)
        w = betas ** 2 / (2 * buffers["posterior_variance"] * alphas32 * (1 - ac))
    elif parameterization == "x0":
        w = 0.5 * torch.sqrt(ac) / (2.0 * 1 - ac)
    else:
        raise ValueError(f"parameterization {parameterization!r} unknown; "
                         f"expected one of {PARAMETERIZATIONS}")
    w[0] = w[1]  # the t=0 weight is infinite (zero posterior variance); reuse t=1's
    if torch.isnan(w).all():
        raise ValueError("lvlb_weights are all NaN; check the beta schedule")
    return w


def schedule_buffers(betas: np.ndarray, v_posterior: float = 0.0,
                     parameterization: str = "eps") -> dict[str, torch.Tensor]:
    """The 12 float32 schedule buffers plus ``lvlb_weights`` (cast once from float64)."""
    arrays = schedule_arrays(betas, v_posterior)
    out = {k: torch.tensor(arrays[k], dtype=torch.float32) for k in SCHEDULE_BUFFERS}
    out["lvlb_weights"] = lvlb_weights(out, 1.0 - arrays["betas"], parameterization)
    return out


@dataclass
class DiffusionSchedule:
    """A plain container of the schedule tensors, for use without a ``DDPM`` module."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    lvlb_weights: torch.Tensor

    @classmethod
    def make(cls, beta_schedule: str = "linear", timesteps: int = 1000,
             linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
             given_betas: np.ndarray | None = None, v_posterior: float = 0.0,
             parameterization: str = "eps") -> DiffusionSchedule:
        """Build from CompVis ``register_schedule`` arguments."""
        betas = given_betas if given_betas is not None else make_beta_schedule(
            beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        return cls(**schedule_buffers(betas, v_posterior, parameterization))

    @property
    def num_timesteps(self) -> int:
        """Number of diffusion steps T."""
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str) -> DiffusionSchedule:
        """A copy with every tensor on ``device``."""
        return DiffusionSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """``a[t]`` reshaped to broadcast over a batch of shape ``x_shape``."""
    b = t.shape[0]
    return a.gather(-1, t).reshape(b, *((1,) * (len(x_shape) - 1)))


def q_sample(sched: ScheduleLike, x_start: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample ``q(x_t | x_0)``."""
    if noise is None:
        noise = torch.randn_like(x_start)
    return (extract_into_tensor(sched.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(sched.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)


def q_mean_variance(sched: ScheduleLike, x_start: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and log-variance of ``q(x_t | x_0)``."""
    mean = extract_into_tensor(sched.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = extract_into_tensor(1.0 - sched.alphas_cumprod, t, x_start.shape)
    log_variance = extract_into_tensor(sched.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance


def predict_start_from_noise(sched: ScheduleLike, x_t: torch.Tensor, t: torch.Tensor,
                             noise: torch.Tensor) -> torch.Tensor:
    """``x_0`` implied by the noise prediction ``noise`` at ``x_t``."""
    return (extract_into_tensor(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)


def predict_eps_from_start(sched: ScheduleLike, x_t: torch.Tensor, t: torch.Tensor,
                           pred_xstart: torch.Tensor) -> torch.Tensor:
    """Noise implied by the ``x_0`` prediction ``pred_xstart`` at ``x_t``."""
    return ((extract_into_tensor(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
             - pred_xstart)
            / extract_into_tensor(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


def q_posterior(sched: ScheduleLike, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
    mean = (extract_into_tensor(sched.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract_into_tensor(sched.posterior_mean_coef2, t, x_t.shape) * x_t)
    variance = extract_into_tensor(sched.posterior_variance, t, x_t.shape)
    log_variance = extract_into_tensor(sched.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


def noise_like(shape: tuple[int, ...], device: torch.device | str | None,
               repeat: bool = False) -> torch.Tensor:
    """Standard normal noise of ``shape``; ``repeat`` shares one draw across the batch."""
    if repeat:
        one = torch.randn((1, *shape[1:]), device=device)
        return one.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int,
                        num_ddpm_timesteps: int, verbose: bool = False) -> np.ndarray:
    """DDPM timesteps visited by DDIM (int64, ascending, +1 as the reference).

    'uniform' uses a stride of ``T // S`` and so yields more than ``S`` steps when ``S`` does
    not divide ``T`` (S=7, T=1000 gives 8 steps), exactly as CompVis.
    """
    if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"number of DDIM steps must be in [1, {num_ddpm_timesteps}], "
                         f"got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2)
        steps = steps.astype(int)
    else:
        raise ValueError(f"ddim_discretize {ddim_discr_method!r} unknown; "
                         "expected 'uniform' or 'quad'")
    # +1 so the final step lands on the alphas that map from the first noise level to data
    steps_out = steps + 1
    # A stride that does not divide T can make the last step T (e.g. S=3: 999 + 1), which
    # the reference indexes out of range; drop it.
    steps_out = steps_out[steps_out < num_ddpm_timesteps]
    if verbose:
        logger.info("selected timesteps for DDIM sampler: %s", steps_out)
    return steps_out


def sqrt_one_minus(alphas: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 - alphas)`` with numpy's correctly rounded sqrt, as the reference's DDIM."""
    return torch.from_numpy(np.sqrt((1.0 - alphas.detach().cpu()).numpy()))


def make_ddim_sampling_parameters(alphacums: torch.Tensor, ddim_timesteps: np.ndarray,
                                  eta: float, verbose: bool = False
                                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(sigmas, alphas, alphas_prev)`` for DDIM with the reference's dtypes.

    ``alphas`` is a float32 tensor, ``alphas_prev`` a float64 array whose first entry is
    ``alphas_cumprod[0]`` (not 1), and ``sigmas`` a float64 tensor.
    """
    alphacums = alphacums.detach().cpu()
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0].item()] + alphacums[ddim_timesteps[:-1]].tolist())
    a64 = alphas.numpy().astype(np.float64)
    # The reference's ``ndarray / float32 tensor`` runs torch's ``__rtruediv__``, i.e. a float32
    # reciprocal times the float64 array; and its ``np.sqrt`` is numpy's (torch's CPU sqrt can
    # differ by an ulp). Reproduce both so sigma_t matches to the last bit.
    recip = torch.reciprocal(1 - alphas).numpy().astype(np.float64)
    sigmas = torch.from_numpy(
        eta * np.sqrt(recip * (1 - alphas_prev) * (1 - a64 / alphas_prev)))
    if verbose:
        logger.info("DDIM a_t: %s; a_(t-1): %s; eta %s gives sigma_t: %s",
                    alphas, alphas_prev, eta, sigmas)
    return sigmas, alphas, alphas_prev
