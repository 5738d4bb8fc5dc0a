"""Shared machinery of the LPIPS + PatchGAN autoencoder losses (VQ and KL variants)."""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ldm.modules.losses.discriminator import (
    D_LOSSES,
    NLayerDiscriminator,
    adopt_weight,
    weights_init,
)
from ldm.modules.losses.lpips import LPIPS


class PerceptualGANLoss(nn.Module):
    """LPIPS (``perceptual_loss``) + PatchGAN (``discriminator``) with adaptive GAN weighting.

    Subclasses implement ``forward``; optimizer index 0 is the autoencoder (generator) update,
    index 1 the discriminator update, as in CompVis/taming.
    """

    def __init__(self, disc_start: int, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0,
                 perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 pixelloss_weight: float = 1.0, lpips_pretrained: bool = True,
                 vgg_weights: str | os.PathLike | None = None,
                 lpips_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        self.pixel_weight = pixelloss_weight
        self.perceptual_loss = LPIPS(pretrained=lpips_pretrained, vgg_weights=vgg_weights,
                                     lpips_weights=lpips_weights)
        self.perceptual_weight = perceptual_weight
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, ndf=disc_ndf,
                                                 n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm)
        self.discriminator.apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = D_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def calculate_adaptive_weight(self, nll_loss: Tensor, g_loss: Tensor,
                                  last_layer: Tensor | None) -> Tensor:
        """``||grad nll|| / (||grad g|| + 1e-4)`` at the decoder's last layer, times disc_weight.

        Without a graph (validation under no_grad) the weight is 0, as in the reference.
        """
        if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
            return torch.zeros((), device=nll_loss.device)
        if last_layer is None:
            raise ValueError("last_layer (the decoder's conv_out.weight) is needed for the "
                             "adaptive discriminator weight")
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _disc_input(self, x: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("disc_conditional=True needs cond")
            return x.contiguous()
        if not self.disc_conditional:
            raise ValueError("cond given but disc_conditional=False")
        return torch.cat((x.contiguous(), cond), dim=1)

    def generator_terms(self, nll_loss: Tensor, reconstructions: Tensor, cond: Tensor | None,
                        global_step: int, last_layer: Tensor | None,
                        ) -> tuple[Tensor, Tensor, float]:
        """``(g_loss, d_weight, disc_factor)`` for the autoencoder update."""
        logits_fake = self.discriminator(self._disc_input(reconstructions, cond))
        g_loss = -torch.mean(logits_fake)
        disc_factor = adopt_weight(self.disc_factor, global_step,
                                   threshold=self.discriminator_iter_start)
        if disc_factor > 0.0:
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        else:  # the GAN term is multiplied by 0: skip the two extra backward passes
            d_weight = torch.zeros((), device=g_loss.device)
        return g_loss, d_weight, disc_factor

    def discriminator_step(self, inputs: Tensor, reconstructions: Tensor, cond: Tensor | None,
                           global_step: int, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on detached real and reconstructed images, and its log."""
        logits_real = self.discriminator(self._disc_input(inputs.detach(), cond))
        logits_fake = self.discriminator(self._disc_input(reconstructions.detach(), cond))
        disc_factor = adopt_weight(self.disc_factor, global_step,
                                   threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log

    def reconstruction_loss(self, inputs: Tensor, reconstructions: Tensor,
                            pixel_loss: str = "l1") -> tuple[Tensor, Tensor]:
        """Per-pixel ``pixel + perceptual_weight * LPIPS`` and the LPIPS term ``(B,1,1,1)``."""
        x, xrec = inputs.contiguous(), reconstructions.contiguous()
        diff = xrec - x
        rec_loss = torch.abs(diff) if pixel_loss == "l1" else diff.pow(2)
        if self.pixel_weight != 1.0:
            rec_loss = self.pixel_weight * rec_loss
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(x, xrec)
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros(1, device=x.device)
        return rec_loss, p_loss
