"""Training, EMA and checkpoint plumbing shared by the first-stage autoencoders.

The models themselves live in :mod:`ldm.models.autoencoder` (the CompVis class paths). Both
autoencoders train two optimizers (autoencoder, then discriminator) per batch with Lightning 2.x
manual optimization.
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
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.modules.ema import LitEma
from ldm.util import LoadReport, instantiate_from_config, load_checkpoint_into, read_state_dict

logger = logging.getLogger(__name__)

# keys of training-only state that an inference model (Identity loss, no EMA) may skip
_OPTIONAL_PREFIXES = ("loss.", "model_ema.")
_LDM_PREFIX = "first_stage_model."


class FirstStageBase(pl.LightningModule):
    """Common code: batch input, EMA, checkpoint loading, adversarial training loop, logging.

    Subclasses build their modules, then call :meth:`_finish_init`, and implement
    ``_ae_parameters``, ``_reconstruct`` and ``_loss_call``.
    """

    image_key: str
    learning_rate: float
    # batches per optimizer step (manual optimization: Lightning's own accumulation does not
    # apply; main.py hands lightning.trainer.accumulate_grad_batches over to this attribute)
    accumulate_grad_batches: int = 1

    # ----------------------------------------------------------------------------- setup
    def _finish_init(self, *, image_key: str, colorize_nlabels: int | None, monitor: str | None,
                     learning_rate: float, scheduler_config: Mapping | None, use_ema: bool,
                     ema_decay: float, ckpt_path: str | Path | None, ignore_keys: Sequence[str],
                     strict_load: bool) -> None:
        self.automatic_optimization = False  # two optimizers per batch, stepped by hand
        self.image_key = image_key
        self.learning_rate = learning_rate
        self.scheduler_config = scheduler_config
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int):
                raise TypeError(f"colorize_nlabels must be an int, got {colorize_nlabels!r}")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.use_ema = use_ema
        self.load_report: LoadReport | None = None
        ema_sd: dict[str, Tensor] = {}
        if ckpt_path is not None:
            ema_sd = self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, strict=strict_load)
        if use_ema:
            # shadows start from the loaded weights; the loss (discriminator) is not averaged
            self.model_ema = LitEma(self._ema_target(), decay=ema_decay)
            logger.info("%s: keeping EMAs of %d parameters", type(self).__name__,
                        len(self.model_ema.m_name2s_name))
            if ema_sd:
                load_checkpoint_into(self.model_ema, ema_sd,
                                     name=f"{type(self).__name__}.model_ema")

    def _ema_target(self) -> nn.ModuleDict:
        """The inference modules (everything but ``loss`` and ``model_ema``) under their names."""
        return nn.ModuleDict({n: m for n, m in self.named_children()
                              if n not in ("loss", "model_ema")})

    # ------------------------------------------------------------------------ checkpoints
    def init_from_ckpt(self, path: str | Path | Mapping[str, Tensor],
                       ignore_keys: Sequence[str] = (), strict: bool = True) -> dict[str, Tensor]:
        """Load a first-stage checkpoint (bare, or a full LDM one with ``first_stage_model.``).

        Keys under ``ignore_keys`` are dropped. ``loss.*`` / ``model_ema.*`` keys are reported
        as ignored when this model has no loss / EMA; a checkpoint without ``loss.*`` keys
        leaves a training loss as constructed (discriminator from scratch). Any other missing
        or unexpected key raises unless ``strict=False``. Returns the checkpoint's EMA weights.
        """
        label = str(path) if isinstance(path, (str, Path)) else "state_dict"
        sd = read_state_dict(path) if isinstance(path, (str, Path)) else dict(path)
        ignored: list[str] = []
        if any(k.startswith(_LDM_PREFIX) for k in sd):
            ignored += [k for k in sd if not k.startswith(_LDM_PREFIX)]
            sd = {k[len(_LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(_LDM_PREFIX)}
        ema_sd = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.")}
        own = self.state_dict()
        skip = [p for p in _OPTIONAL_PREFIXES if not any(k.startswith(p) for k in own)]
        if any(k.startswith("loss.") for k in own) and not any(k.startswith("loss.") for k in sd):
            logger.warning("%s: %s has no loss.* weights; the loss keeps its constructed "
                           "weights (discriminator trained from scratch)", type(self).__name__,
                           label)
            sd.update({k: v for k, v in own.items() if k.startswith("loss.")})
        report: LoadReport = load_checkpoint_into(
            self, sd, ignore_keys=(*tuple(ignore_keys), *skip), allow_missing=not strict,
            allow_unexpected=not strict, name=f"{type(self).__name__} (checkpoint {label})")
        report.ignored = ignored + report.ignored
        self.load_report = report
        return ema_sd if self.use_ema and "model_ema." in skip else {}

    # ------------------------------------------------------------------------------- EMA
    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap in the EMA weights (no-op without ``use_ema``)."""
        if not self.use_ema:
            yield None
            return
        with self.model_ema.swapped_in(self._ema_target(), context):
            yield None

    # ----------------------------------------------------------------------------- input
    def get_input(self, batch: Mapping[str, Any], k: str) -> Tensor:
        """``batch[k]`` ``(B, H, W, C)`` (CompVis layout) -> float ``(B, C, H, W)``."""
        if k not in batch:
            raise KeyError(f"batch has no key {k!r} (image_key); keys: {sorted(batch)}")
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"batch[{k!r}] must be (B, H, W, C), got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    @property
    def loss_step(self) -> int:
        """Batches trained so far: Lightning counts both optimizers' steps in ``global_step``."""
        return self.global_step // 2

    def get_last_layer(self) -> Tensor:
        """The decoder's output conv weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    # -------------------------------------------------------------------------- training
    def _ae_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def _discriminator(self) -> nn.Module:
        disc = getattr(self.loss, "discriminator", None)
        if disc is None:
            raise RuntimeError(f"{type(self).__name__} cannot be trained with lossconfig "
                               f"{type(self.loss).__name__}: use a loss with a discriminator "
                               "(e.g. ldm.modules.losses.VQLPIPSWithDiscriminator)")
        return disc

    def _optimizers_for(self, lr_ae: float, lr_disc: float) -> Any:
        opt_ae = torch.optim.Adam(self._ae_parameters(), lr=lr_ae, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(self._discriminator().parameters(), lr=lr_disc,
                                    betas=(0.5, 0.9))
        if self.scheduler_config is None:
            return [opt_ae, opt_disc]
        sched = instantiate_from_config(self.scheduler_config)
        logger.info("%s: LambdaLR schedule %s on both optimizers", type(self).__name__,
                    type(sched).__name__)
        schedulers = [{"scheduler": torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=sched.schedule),
                       "interval": "step", "frequency": 1} for o in (opt_ae, opt_disc)]
        return [opt_ae, opt_disc], schedulers

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Autoencoder step, then discriminator step, on one batch (one forward pass).

        With ``accumulate_grad_batches`` n > 1, both losses are divided by n and the optimizers
        (with EMA and schedulers) step on every n-th batch, as Lightning 1.x accumulated the
        two optimizers of the original code.
        """
        n = self.accumulate_grad_batches
        self._accumulated = getattr(self, "_accumulated", 0) + 1
        first, step = self._accumulated == 1, self._accumulated >= n
        x = self.get_input(batch, self.image_key)
        out = self._reconstruct(x)
        opt_ae, opt_disc = self.optimizers()
        self.toggle_optimizer(opt_ae)  # no generator-loss gradients into the discriminator
        aeloss, log_ae = self._loss_call(x, out, 0, "train")
        if first:
            opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(aeloss / n if n > 1 else aeloss)
        if step:
            opt_ae.step()
            # EMA right after the step (not in on_train_batch_end): checkpoint callbacks run
            # before the module's batch-end hook, so a checkpoint would miss this update.
            if self.use_ema:
                self.model_ema(self._ema_target())
        self.untoggle_optimizer(opt_ae)

        self.toggle_optimizer(opt_disc)
        discloss, log_disc = self._loss_call(x, out, 1, "train")
        if first:
            opt_disc.zero_grad(set_to_none=True)
        self.manual_backward(discloss / n if n > 1 else discloss)
        if step:
            opt_disc.step()
        self.untoggle_optimizer(opt_disc)

        if step:
            self._accumulated = 0
            schedulers = self.lr_schedulers()
            if schedulers is not None:
                for s in schedulers if isinstance(schedulers, list) else [schedulers]:
                    s.step()
        self.log("aeloss", aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log("discloss", discloss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log_dict(log_ae, prog_bar=False, on_step=True, on_epoch=False)
        self.log_dict(log_disc, prog_bar=False, on_step=True, on_epoch=False)
        return aeloss.detach()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        log = self._validation_step(batch, batch_idx)
        if self.use_ema:
            with self.ema_scope():
                log.update(self._validation_step(batch, batch_idx, suffix="_ema"))
        return log

    def _validation_step(self, batch: Mapping[str, Any], batch_idx: int,
                         suffix: str = "") -> dict[str, Tensor]:
        x = self.get_input(batch, self.image_key)
        out = self._reconstruct(x)
        split = "val" + suffix
        aeloss, log_ae = self._loss_call(x, out, 0, split)
        _, log_disc = self._loss_call(x, out, 1, split)
        rec_loss = log_ae.pop(f"{split}/rec_loss")
        self.log(f"{split}/rec_loss", rec_loss, prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True)
        self.log(f"{split}/aeloss", aeloss, prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True)
        self.log_dict(log_ae, sync_dist=True)
        self.log_dict(log_disc, sync_dist=True)
        return {f"{split}/rec_loss": rec_loss, f"{split}/aeloss": aeloss.detach()}

    def _reconstruct(self, x: Tensor) -> tuple:
        raise NotImplementedError

    def _loss_call(self, x: Tensor, out: tuple, optimizer_idx: int,
                   split: str) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------- images
    def to_rgb(self, x: Tensor) -> Tensor:
        """Random projection of a many-channel (segmentation) map to RGB in [-1, 1]."""
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


def resize_batch(x: Tensor, size_range: Sequence[int], global_step: int) -> Tensor:
    """Random per-batch resize (multiples of 16 in ``size_range``; the largest at first)."""
    lower, upper = size_range
    new = upper if global_step <= 4 else int(np.random.choice(np.arange(lower, upper + 16, 16)))
    if new != x.shape[2]:
        x = F.interpolate(x, size=new, mode="bicubic")
    return x.detach()
