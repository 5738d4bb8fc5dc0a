"""Training loss of the KL autoencoders: L1 + LPIPS with a learned scale, KL and PatchGAN."""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.base import PerceptualGANLoss


class LPIPSWithDiscriminator(PerceptualGANLoss):
    """CompVis KL-VAE loss; keys ``logvar``, ``perceptual_loss.*``, ``discriminator.*``."""

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3,
                 disc_in_channels: int = 3, disc_factor: float = 1.0, disc_weight: float = 1.0,
                 perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_loss: str = "hinge",
                 lpips_pretrained: bool = True, vgg_weights: str | os.PathLike | None = None,
                 lpips_weights: str | os.PathLike | None = None) -> None:
        super().__init__(disc_start, disc_num_layers=disc_num_layers,
                         disc_in_channels=disc_in_channels, disc_factor=disc_factor,
                         disc_weight=disc_weight, perceptual_weight=perceptual_weight,
                         use_actnorm=use_actnorm, disc_conditional=disc_conditional,
                         disc_loss=disc_loss, pixelloss_weight=pixelloss_weight,
                         lpips_pretrained=lpips_pretrained, vgg_weights=vgg_weights,
                         lpips_weights=lpips_weights)
        self.kl_weight = kl_weight
        # output log-variance; not in the reference optimizer, so it stays at logvar_init
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)

    def forward(self, inputs: Tensor, reconstructions: Tensor,
                posteriors: DiagonalGaussianDistribution, optimizer_idx: int, global_step: int,
                last_layer: Tensor | None = None, cond: Tensor | None = None,
                split: str = "train", weights: Tensor | None = None,
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder loss (``optimizer_idx=0``) or discriminator loss (``1``) and a log dict."""
        if optimizer_idx == 1:
            return self.discriminator_step(inputs, reconstructions, cond, global_step, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 or 1, got {optimizer_idx}")
        rec_loss, _ = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        g_loss, d_weight, disc_factor = self.generator_terms(nll_loss, reconstructions, cond,
                                                             global_step, last_layer)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(float(disc_factor), device=loss.device),
               f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log
