"""First-stage autoencoders (CompVis class paths): VQModel, VQModelInterface, AutoencoderKL.

State-dict keys match CompVis latent-diffusion: ``encoder.*``, ``decoder.*``, ``loss.*`` (only
with a training loss), ``quantize.embedding.weight``, ``quant_conv.*``, ``post_quant_conv.*``.
As a frozen first stage inside LatentDiffusion use ``lossconfig: {target: torch.nn.Identity}``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.models.first_stage_base import FirstStageBase, resize_batch
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

DEFAULT_LR = 4.5e-6


class VQModel(FirstStageBase):
    """VQ-GAN autoencoder: ``encode`` returns ``(quant, emb_loss, info)``.

    ``learning_rate`` is the discriminator LR; the autoencoder uses ``lr_g_factor`` times it.
    ``ckpt_path`` loads strictly (see :meth:`init_from_ckpt`); ``use_ema`` keeps an EMA of the
    autoencoder weights (``model_ema.*``) used by ``ema_scope`` and the ``val_ema`` metrics.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], n_embed: int,
                 embed_dim: int, ckpt_path: str | Path | None = None,
                 ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None,
                 batch_resize_range: Sequence[int] | None = None,
                 scheduler_config: Mapping | None = None, lr_g_factor: float = 1.0,
                 remap: str | None = None, sane_index_shape: bool = False,
                 use_ema: bool = False, ema_decay: float = 0.9999,
                 learning_rate: float = DEFAULT_LR, strict_load: bool = True) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap,
                                        sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.batch_resize_range = batch_resize_range
        if batch_resize_range is not None:
            logger.info("%s: per-batch resizing in range %s", type(self).__name__,
                        batch_resize_range)
        self.lr_g_factor = lr_g_factor
        self._finish_init(image_key=image_key, colorize_nlabels=colorize_nlabels,
                          monitor=monitor, learning_rate=learning_rate,
                          scheduler_config=scheduler_config, use_ema=use_ema,
                          ema_decay=ema_decay, ckpt_path=ckpt_path, ignore_keys=ignore_keys,
                          strict_load=strict_load)

    # --------------------------------------------------------------------------- model
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """Image -> ``(quant, emb_loss, (None, None, indices))``."""
        return self.quantize(self.encode_to_prequant(x))

    def encode_to_prequant(self, x: Tensor) -> Tensor:
        """Image -> pre-quantization latent (``quant_conv`` output)."""
        return self.quant_conv(self.encoder(x))

    def encode_moments(self, x: Tensor) -> Tensor:
        """What a latent cache stores: the pre-quantization latent (one point, no spread)."""
        return self.encode_to_prequant(x)

    def decode(self, quant: Tensor) -> Tensor:
        """Quantized latent -> image."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code: Tensor) -> Tensor:
        """Codebook indices ``(B, h, w)`` -> image."""
        if code.ndim != 3:
            raise ValueError(f"code must be (B, h, w) indices, got shape {tuple(code.shape)}")
        b, h, w = code.shape
        quant = self.quantize.get_codebook_entry(code.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, input: Tensor, return_pred_indices: bool = False,  # noqa: A002
                ) -> tuple[Tensor, ...]:
        """``(reconstruction, codebook loss[, indices])``."""
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_input(self, batch: Mapping[str, Any], k: str) -> Tensor:
        x = super().get_input(batch, k)
        if self.batch_resize_range is not None:
            x = resize_batch(x, self.batch_resize_range, self.loss_step)
        return x

    # ------------------------------------------------------------------------ training
    def _reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self(x, return_pred_indices=True)

    def _loss_call(self, x: Tensor, out: tuple, optimizer_idx: int,
                   split: str) -> tuple[Tensor, dict[str, Tensor]]:
        xrec, qloss, ind = out
        return self.loss(qloss, x, xrec, optimizer_idx, self.loss_step,
                         last_layer=self.get_last_layer(), split=split, predicted_indices=ind)

    def _ae_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(),
                *self.quantize.parameters(), *self.quant_conv.parameters(),
                *self.post_quant_conv.parameters()]

    def configure_optimizers(self) -> Any:
        lr_d = self.learning_rate
        lr_g = self.lr_g_factor * self.learning_rate
        logger.info("%s: lr_d %.3g, lr_g %.3g", type(self).__name__, lr_d, lr_g)
        return self._optimizers_for(lr_g, lr_d)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False,
                   plot_ema: bool = False, **kwargs: Any) -> dict[str, Tensor]:
        """Inputs and reconstructions (and EMA reconstructions) of up to ``N`` images."""
        x = self.get_input(batch, self.image_key)[:N].to(self.device)
        log = {"inputs": x}
        if only_inputs:
            return log
        xrec, _ = self(x)
        if x.shape[1] > 3:  # segmentation maps: colorize with a random projection
            log["inputs"], xrec = self.to_rgb(x), self.to_rgb(xrec)
        log["reconstructions"] = xrec
        if plot_ema and self.use_ema:
            with self.ema_scope():
                xrec_ema, _ = self(x)
            log["reconstructions_ema"] = self.to_rgb(xrec_ema) if x.shape[1] > 3 else xrec_ema
        return log


class VQModelInterface(VQModel):
    """VQModel as a LatentDiffusion first stage: latents are taken *before* quantization.

    ``encode`` returns the ``quant_conv`` output; ``decode`` quantizes first (unless
    ``force_not_quantize``). ``forward`` is a full reconstruction.
    """

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Image -> pre-quantization latent ``h``."""
        return self.encode_to_prequant(x)

    def latent_from_moments(self, moments: Tensor, sample: bool) -> Tensor:
        """The pre-quantization latent itself (``sample`` has nothing to draw)."""
        return moments

    def encode_latent(self, x: Tensor, sample: bool) -> Tensor:
        """Image -> pre-quantization latent ``h`` (the first-stage contract)."""
        return self.encode_to_prequant(x)

    def decode(self, h: Tensor, force_not_quantize: bool = False) -> Tensor:  # type: ignore[override]
        """Latent -> image, quantizing ``h`` first unless ``force_not_quantize``."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input: Tensor, return_pred_indices: bool = False,  # noqa: A002
                ) -> tuple[Tensor, ...]:
        """``(reconstruction, codebook loss[, indices])``, as ``VQModel.forward``."""
        quant, diff, (_, _, ind) = self.quantize(self.encode(input))
        dec = self.decode(quant, force_not_quantize=True)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def decode_code(self, code: Tensor) -> Tensor:
        b, h, w = code.shape
        quant = self.quantize.get_codebook_entry(code.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant, force_not_quantize=True)


class AutoencoderKL(FirstStageBase):
    """KL-regularised autoencoder (the Stable Diffusion VAE is ``kl-f8``).

    ``encode`` returns a :class:`DiagonalGaussianDistribution`; ``forward`` samples it (or takes
    its mode) and decodes. Training, ``use_ema`` and ``ckpt_path`` behave as in :class:`VQModel`.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: int,
                 ckpt_path: str | Path | None = None, ignore_keys: Sequence[str] = (),
                 image_key: str = "image", colorize_nlabels: int | None = None,
                 monitor: str | None = None, scheduler_config: Mapping | None = None,
                 use_ema: bool = False, ema_decay: float = 0.9999,
                 learning_rate: float = DEFAULT_LR, strict_load: bool = True) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self._finish_init(image_key=image_key, colorize_nlabels=colorize_nlabels,
                          monitor=monitor, learning_rate=learning_rate,
                          scheduler_config=scheduler_config, use_ema=use_ema,
                          ema_decay=ema_decay, ckpt_path=ckpt_path, ignore_keys=ignore_keys,
                          strict_load=strict_load)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Image -> posterior over latents."""
        return DiagonalGaussianDistribution(self.encode_moments(x))

    def encode_moments(self, x: Tensor) -> Tensor:
        """Image -> posterior parameters (mean and log-variance on ``2 * embed_dim`` channels)."""
        return self.quant_conv(self.encoder(x))

    def latent_from_moments(self, moments: Tensor, sample: bool) -> Tensor:
        """A posterior sample (``sample=True``, as training does) or the posterior mode."""
        posterior = DiagonalGaussianDistribution(moments)
        return posterior.sample() if sample else posterior.mode()

    def encode_latent(self, x: Tensor, sample: bool) -> Tensor:
        """Image -> latent (the first-stage contract)."""
        return self.latent_from_moments(self.encode_moments(x), sample)

    def decode(self, z: Tensor, force_not_quantize: bool = False) -> Tensor:
        """Latent -> image (a continuous latent: ``force_not_quantize`` changes nothing)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input: Tensor, sample_posterior: bool = True,  # noqa: A002
                ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """``(reconstruction, posterior)``."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _reconstruct(self, x: Tensor) -> tuple[Tensor, DiagonalGaussianDistribution]:
        return self(x)

    def _loss_call(self, x: Tensor, out: tuple, optimizer_idx: int,
                   split: str) -> tuple[Tensor, dict[str, Tensor]]:
        xrec, posterior = out
        return self.loss(x, xrec, posterior, optimizer_idx, self.loss_step,
                         last_layer=self.get_last_layer(), split=split)

    def _ae_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(),
                *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]

    def configure_optimizers(self) -> Any:
        return self._optimizers_for(self.learning_rate, self.learning_rate)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False,
                   plot_ema: bool = False, **kwargs: Any) -> dict[str, Tensor]:
        """Inputs, reconstructions and decoded prior samples of up to ``N`` images."""
        x = self.get_input(batch, self.image_key)[:N].to(self.device)
        log = {"inputs": x}
        if only_inputs:
            return log
        xrec, posterior = self(x)
        samples = self.decode(torch.randn_like(posterior.sample()))
        if x.shape[1] > 3:
            log["inputs"], xrec, samples = self.to_rgb(x), self.to_rgb(xrec), self.to_rgb(samples)
        log["samples"] = samples
        log["reconstructions"] = xrec
        if plot_ema and self.use_ema:
            with self.ema_scope():
                xrec_ema, _ = self(x)
            log["reconstructions_ema"] = self.to_rgb(xrec_ema) if x.shape[1] > 3 else xrec_ema
        return log


class IdentityFirstStage(nn.Module):
    """No-op first stage (pixel-space diffusion); ``vq_interface`` mimics the quantizer API."""

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x

    def encode_moments(self, x: Tensor) -> Tensor:
        return x

    def latent_from_moments(self, moments: Tensor, sample: bool) -> Tensor:
        return moments

    def encode_latent(self, x: Tensor, sample: bool) -> Tensor:
        return x

    def decode(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x

    def quantize(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor | tuple:
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x


__all__ = ["AutoencoderKL", "IdentityFirstStage", "VQModel", "VQModelInterface",
           "VectorQuantizer"]
