"""DDPM: Gaussian diffusion as a LightningModule (CompVis ``ldm.models.diffusion.ddpm``).

The schedule and posterior math live in :mod:`ldm.models.diffusion.schedule`; this module
keeps the CompVis class paths, constructor arguments, buffer names and loss exactly, so
CompVis/PathLDM configs and checkpoints work unchanged. ``LatentDiffusion`` lives in
:mod:`ldm.models.diffusion.latent_diffusion` and is re-exported here under its CompVis path
``ldm.models.diffusion.ddpm.LatentDiffusion``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ldm.checkpoint import legacy_keys
from ldm.models.diffusion import schedule as S
from ldm.modules.ema import LitEma
from ldm.optim import adamw
from ldm.util import count_params, instantiate_from_config, load_checkpoint_into, read_state_dict

logger = logging.getLogger(__name__)

__conditioning_keys__ = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}
CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")



class DiffusionWrapper(nn.Module):
    """Holds the U-Net as ``diffusion_model`` and routes conditioning into it."""

    def __init__(self, diff_model_config: Mapping, conditioning_key: str | None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key {conditioning_key!r} unknown; expected one of "
                             f"{CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: list | None = None,
                c_crossattn: list | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """U-Net output for ``x`` at ``t`` with the conditioning of ``conditioning_key``.

        ``y`` (a Conditioner's vector, or class ids) goes to the U-Net's ``label_emb`` with any
        key; with ``adm`` it defaults to ``c_crossattn[0]`` (CompVis).
        """
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t, y=y)
        if key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, y=y)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), y=y)
        if key == "hybrid":
            xc = torch.cat([x, *c_concat], dim=1)
            return self.diffusion_model(xc, t, context=torch.cat(c_crossattn, 1), y=y)
        return self.diffusion_model(x, t, y=c_crossattn[0] if y is None else y)  # "adm"


class DDPM(pl.LightningModule):
    """Classic DDPM with Gaussian diffusion in image space (CompVis constructor)."""

    def __init__(self, unet_config: Mapping, timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: str | Path | None = None,
                 ignore_keys: Sequence[str] = (), load_only_unet: bool = False,
                 monitor: str | None = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3,
                 log_every_t: int = 100, clip_denoised: bool = True, linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3,
                 given_betas: Sequence[float] | None = None, original_elbo_weight: float = 0.0,
                 v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: str | None = None, parameterization: str = "eps",
                 scheduler_config: Mapping | None = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0,
                 learning_rate: float = 1.0e-4) -> None:
        super().__init__()
        if parameterization not in S.PARAMETERIZATIONS:
            raise ValueError(f"parameterization {parameterization!r} unknown; expected one of "
                             f"{S.PARAMETERIZATIONS}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type {loss_type!r} unknown; expected 'l1' or 'l2'")
        if use_positional_encodings:
            raise NotImplementedError("use_positional_encodings is not supported")
        self.parameterization = parameterization
        logger.info("%s: running in %s-prediction mode", type(self).__name__, parameterization)
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.learning_rate = learning_rate
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        logger.info("DiffusionWrapper has %.2f M params", count_params(self.model) * 1e-6)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
            logger.info("keeping EMAs of %d parameters", len(self.model_ema.m_name2s_name))
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule,
                               timesteps=timesteps, linear_start=linear_start,
                               linear_end=linear_end, cosine_s=cosine_s)
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        # a plain attribute (not in the state_dict) unless learned, as the reference
        self.logvar = torch.full(fill_value=logvar_init, size=(self.num_timesteps,))
        if learn_logvar:
            self.logvar = nn.Parameter(self.logvar, requires_grad=True)
        if ckpt_path is not None:  # after the schedule, so its buffers load strictly too
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # ----------------------------------------------------------------------------- schedule
    def register_schedule(self, given_betas: Sequence[float] | None = None,
                          beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3) -> None:
        """(Re)compute the 12 schedule buffers and the non-persistent ``lvlb_weights``."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = S.make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                         linear_end=linear_end, cosine_s=cosine_s)
        buffers = S.schedule_buffers(betas, self.v_posterior, self.parameterization)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        device = self.betas.device if hasattr(self, "betas") else None
        for name in S.SCHEDULE_BUFFERS:
            self.register_buffer(name, buffers[name].to(device))
        self.register_buffer("lvlb_weights", buffers["lvlb_weights"].to(device), persistent=False)

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of ``q(x_t | x_0)``."""
        return S.q_mean_variance(self, x_start, t)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor,
                                 noise: torch.Tensor) -> torch.Tensor:
        """``x_0`` implied by a noise prediction."""
        return S.predict_start_from_noise(self, x_t, t, noise)

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor,
                                 pred_xstart: torch.Tensor) -> torch.Tensor:
        return S.predict_eps_from_start(self, x_t, t, pred_xstart)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        return S.q_posterior(self, x_start, x_t, t)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Diffuse ``x_start`` to step ``t``."""
        return S.q_sample(self, x_start, t, noise)

    # ---------------------------------------------------------------------------- EMA, ckpt
    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap the EMA weights into the model (no-op without EMA)."""
        if not self.use_ema:
            yield None
            return
        with self.model_ema.swapped_in(self.model, context):
            yield None

    def init_from_ckpt(self, path: str | Path | Mapping[str, torch.Tensor],
                       ignore_keys: Sequence[str] = (), only_model: bool = False):
        """Load a CompVis/PathLDM checkpoint; fail on missing/unexpected keys.

        ``only_model`` loads just the U-Net (from a full LDM checkpoint, a ``diffusion_model.*``
        one or a bare one). Keys of the original that this model lacks by design (FID network,
        old text position ids, EMA when ``use_ema`` is off) are reported as ignored. When the
        checkpoint has no EMA weights but ``use_ema`` is on, the EMA starts from the loaded
        weights.
        """
        sd = read_state_dict(path) if isinstance(path, (str, Path)) else dict(path)
        ignore_keys = tuple(ignore_keys or ())
        if only_model:
            prefix = next((p for p in ("model.diffusion_model.", "diffusion_model.")
                           if any(k.startswith(p) for k in sd)), None)
            return load_checkpoint_into(self.model.diffusion_model, sd, prefix=prefix,
                                        ignore_keys=ignore_keys, name="diffusion_model")
        extra = legacy_keys(sd, self.state_dict())
        if not self.use_ema:
            extra.append("model_ema.")
        reinit_ema = self.use_ema and not any(k.startswith("model_ema.") for k in sd)
        if reinit_ema:
            ema, self.model_ema = self.model_ema, nn.Module()  # placeholder keeps the position
        try:
            report = load_checkpoint_into(self, sd, ignore_keys=ignore_keys + tuple(extra),
                                          name=type(self).__name__)
        finally:
            if reinit_ema:
                self.model_ema = ema
        if reinit_ema:
            logger.info("checkpoint has no EMA weights; starting the EMA from the loaded ones")
            self.model_ema = LitEma(self.model)
        return report

    # -------------------------------------------------------------------------------- loss
    def _denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Raw model output (eps or x0) at ``x``, ``t``."""
        return self.model(x, t).to(x.dtype)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """L1 or L2 error, averaged or per element."""
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        reduction = "mean" if mean else "none"
        return torch.nn.functional.mse_loss(target, pred, reduction=reduction)

    def _logvar_at(self, t: torch.Tensor) -> torch.Tensor:
        if not self.learn_logvar:
            self.logvar = self.logvar.to(self.device)
        return self.logvar[t].to(self.device)

    def _p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self._denoise(x_noisy, t, cond)
        target = x_start if self.parameterization == "x0" else noise
        prefix = "train" if self.training else "val"
        dims = tuple(range(1, x_start.ndim))
        loss_simple = self.get_loss(model_output, target, mean=False).mean(dims)
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}
        logvar_t = self._logvar_at(t)
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Training loss at timesteps ``t`` and its ``{train,val}/...`` log dict."""
        return self._p_losses(x_start, None, t, noise)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        """Loss at uniformly drawn timesteps."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, t, *args, **kwargs)

    # ------------------------------------------------------------------------ ancestral sampling
    def _p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, cond: Any, clip_denoised: bool,
                         quantize_denoised: bool = False):
        model_out = self._denoise(x, t, cond)
        if self.parameterization == "eps":
            x_recon = self.predict_start_from_noise(x, t=t, noise=model_out)
        else:
            x_recon = model_out
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        if quantize_denoised:
            x_recon = self.first_stage_model.quantize(x_recon)[0]
        mean, variance, log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        return mean, variance, log_variance, x_recon

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool):
        """Mean, variance and log-variance of ``p(x_{t-1} | x_t)``."""
        return self._p_mean_variance(x, t, None, clip_denoised)[:3]

    @torch.no_grad()
    def _p_sample(self, x: torch.Tensor, t: torch.Tensor, cond: Any, clip_denoised: bool,
                  repeat_noise: bool = False, temperature: float = 1.0,
                  quantize_denoised: bool = False):
        mean, _, log_variance, x0 = self._p_mean_variance(x, t, cond, clip_denoised,
                                                          quantize_denoised)
        noise = S.noise_like(x.shape, x.device, repeat_noise) * temperature
        nonzero_mask = (1 - (t == 0).float()).reshape(x.shape[0], *((1,) * (x.ndim - 1)))
        return mean + nonzero_mask * (0.5 * log_variance).exp() * noise, x0

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 repeat_noise: bool = False) -> torch.Tensor:
        """One ancestral step ``x_t -> x_{t-1}``."""
        return self._p_sample(x, t, None, clip_denoised, repeat_noise)[0]

    @torch.no_grad()
    def _p_sample_loop(self, shape: Sequence[int], cond: Any = None,
                       x_T: torch.Tensor | None = None, verbose: bool = True,
                       timesteps: int | None = None, log_every_t: int | None = None,
                       quantize_denoised: bool = False, mask: torch.Tensor | None = None,
                       x0: torch.Tensor | None = None):
        log_every_t = log_every_t or self.log_every_t
        device = self.betas.device
        img = torch.randn(tuple(shape), device=device) if x_T is None else x_T
        timesteps = self.num_timesteps if timesteps is None else timesteps
        intermediates = [img]
        for i in tqdm(reversed(range(timesteps)), desc="Sampling t", total=timesteps,
                      disable=not verbose):
            ts = torch.full((img.shape[0],), i, device=device, dtype=torch.long)
            cond_t = self._noisy_cond(cond, ts)
            img = self._p_sample(img, ts, cond_t, self.clip_denoised,
                                 quantize_denoised=quantize_denoised)[0]
            if mask is not None:
                img = self.q_sample(x0, ts) * mask + (1.0 - mask) * img
            if i % log_every_t == 0 or i == timesteps - 1:
                intermediates.append(img)
        return img, intermediates

    def _noisy_cond(self, cond: Any, ts: torch.Tensor) -> Any:
        return cond

    @torch.no_grad()
    def p_sample_loop(self, shape: Sequence[int], return_intermediates: bool = False):
        """Ancestral sampling through all ``num_timesteps`` steps."""
        img, intermediates = self._p_sample_loop(shape)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False):
        """Ancestral samples of ``(channels, image_size, image_size)``."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape, return_intermediates=return_intermediates)

    # --------------------------------------------------------------------------- training
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` from ``(B, H, W, C)`` to a contiguous float ``(B, C, H, W)``."""
        if k not in batch:
            raise KeyError(f"batch has no key {k!r} (keys: {sorted(batch)})")
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        x = x.permute(0, 3, 1, 2)
        return x.to(memory_format=torch.contiguous_format).float()

    def _batch_size(self, batch: Mapping[str, Any]) -> int:
        for key in (self.first_stage_key, "latent"):
            if key in batch and hasattr(batch[key], "shape"):
                return int(batch[key].shape[0])
        return 1

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        """Loss on a batch."""
        return self(self.get_input(batch, self.first_stage_key))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss and logs (``train/loss_simple``, ``train/loss_vlb``, ``train/loss``)."""
        loss, loss_dict = self.shared_step(batch)
        bs = self._batch_size(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True,
                      batch_size=bs)
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True,
                 on_step=True, on_epoch=False, batch_size=bs)
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, logger=True, on_step=True, on_epoch=False,
                     batch_size=bs)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Validation loss with the raw and (``*_ema``) the EMA weights."""
        _, loss_dict_no_ema = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {key + "_ema": value for key, value in loss_dict_ema.items()}
        bs = self._batch_size(batch)
        for d in (loss_dict_no_ema, loss_dict_ema):
            self.log_dict(d, prog_bar=False, logger=True, on_step=False, on_epoch=True,
                          batch_size=bs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """EMA update after every optimizer step.

        Done here rather than in ``on_train_batch_end`` because Lightning runs the callbacks'
        ``on_train_batch_end`` (where checkpoints are saved) before the module's: a checkpoint
        would miss the step's EMA update and a resumed run would lose it.
        """
        super().optimizer_step(*args, **kwargs)
        if self.use_ema:
            self.model_ema(self.model)

    def _trainable_params(self) -> list[torch.Tensor]:
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        """AdamW at ``learning_rate``; optional per-step ``LambdaLR`` (``scheduler_config``)."""
        # Fused AdamW (same update, one pass per tensor) unless gradient clipping is configured:
        # Lightning refuses to clip under mixed precision with a fused optimizer.
        trainer = self._trainer
        clipping = trainer is not None and bool(trainer.gradient_clip_val)
        opt = adamw(self._trainable_params(), lr=self.learning_rate, prefer_fused=not clipping)
        if not self.use_scheduler:
            return opt
        if "target" not in self.scheduler_config:
            raise KeyError("scheduler_config needs a 'target' (e.g. "
                           "ldm.lr_scheduler.LambdaLinearScheduler)")
        scheduler = instantiate_from_config(self.scheduler_config)
        logger.info("setting up LambdaLR scheduler %s", self.scheduler_config["target"])
        lr_scheduler = {"scheduler": LambdaLR(opt, lr_lambda=scheduler.schedule),
                        "interval": "step", "frequency": 1}
        return [opt], [lr_scheduler]

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 2,
                   sample: bool = True, return_keys: Sequence[str] | None = None,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """Inputs, a forward-diffusion row and (EMA) samples, as tensors in [-1, 1]."""
        from torchvision.utils import make_grid

        x = self.get_input(batch, self.first_stage_key).to(self.device)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        log = {"inputs": x[:N]}
        x_start = x[:n_row]
        rows = []
        for t in range(self.num_timesteps):
            if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                ts = torch.full((n_row,), t, device=self.device, dtype=torch.long)
                rows.append(self.q_sample(x_start, ts))
        grid = torch.stack(rows, 1).flatten(0, 1)  # row-major: one row per input
        log["diffusion_row"] = make_grid(grid, nrow=len(rows))
        if sample:
            with self.ema_scope("Plotting"):
                log["samples"] = self.sample(batch_size=N)
        if return_keys:
            return {k: v for k, v in log.items() if k in return_keys} or log
        return log


def __getattr__(name: str) -> Any:
    # Lazy re-export: latent_diffusion imports this module, so a top-level import would cycle.
    if name == "LatentDiffusion":
        from ldm.models.diffusion.latent_diffusion import LatentDiffusion

        return LatentDiffusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
