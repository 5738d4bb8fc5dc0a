"""Training loss of the VQ autoencoders: L1 + LPIPS + codebook loss + adaptive PatchGAN."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.modules.losses.base import PerceptualGANLoss
from ldm.modules.losses.discriminator import (  # noqa: F401 (CompVis import paths)
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
)


def measure_perplexity(predicted_indices: Tensor, n_embed: int) -> tuple[Tensor, Tensor]:
    """Codebook perplexity and the number of codes used in a batch of indices."""
    encodings = F.one_hot(predicted_indices.reshape(-1), n_embed).float()
    avg_probs = encodings.mean(0)
    perplexity = (-(avg_probs * torch.log(avg_probs + 1e-10)).sum()).exp()
    cluster_use = torch.sum(avg_probs > 0).float()
    return perplexity, cluster_use


class VQLPIPSWithDiscriminator(PerceptualGANLoss):
    """taming's ``VQLPIPSWithDiscriminator`` (plus latent-diffusion's ``n_classes``/``pixel_loss``).

    State-dict keys: ``perceptual_loss.*`` (frozen LPIPS) and ``discriminator.main.*``.
    ``lpips_pretrained`` / ``vgg_weights`` / ``lpips_weights`` choose the LPIPS weights
    (see :mod:`ldm.modules.losses.lpips`).
    """

    def __init__(self, disc_start: int, codebook_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3,
                 disc_in_channels: int = 3, disc_factor: float = 1.0, disc_weight: float = 1.0,
                 perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 n_classes: int | None = None, perceptual_loss: str = "lpips",
                 pixel_loss: str = "l1", lpips_pretrained: bool = True,
                 vgg_weights: str | os.PathLike | None = None,
                 lpips_weights: str | os.PathLike | None = None) -> None:
        if perceptual_loss != "lpips":
            raise ValueError(f"perceptual_loss {perceptual_loss!r} is not supported (only 'lpips')")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        super().__init__(disc_start, disc_num_layers=disc_num_layers,
                         disc_in_channels=disc_in_channels, disc_factor=disc_factor,
                         disc_weight=disc_weight, perceptual_weight=perceptual_weight,
                         use_actnorm=use_actnorm, disc_conditional=disc_conditional,
                         disc_ndf=disc_ndf, disc_loss=disc_loss,
                         pixelloss_weight=pixelloss_weight, lpips_pretrained=lpips_pretrained,
                         vgg_weights=vgg_weights, lpips_weights=lpips_weights)
        self.codebook_weight = codebook_weight
        self.n_classes = n_classes
        self.pixel_loss = pixel_loss

    def forward(self, codebook_loss: Tensor, inputs: Tensor, reconstructions: Tensor,
                optimizer_idx: int, global_step: int, last_layer: Tensor | None = None,
                cond: Tensor | None = None, split: str = "train",
                predicted_indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder loss (``optimizer_idx=0``) or discriminator loss (``1``) and a log dict."""
        if optimizer_idx == 1:
            return self.discriminator_step(inputs, reconstructions, cond, global_step, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 or 1, got {optimizer_idx}")
        rec_loss, p_loss = self.reconstruction_loss(inputs, reconstructions, self.pixel_loss)
        nll_loss = torch.mean(rec_loss)
        g_loss, d_weight, disc_factor = self.generator_terms(nll_loss, reconstructions, cond,
                                                             global_step, last_layer)
        loss = (nll_loss + d_weight * disc_factor * g_loss
                + self.codebook_weight * codebook_loss.mean())
        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/quant_loss": codebook_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(float(disc_factor), device=loss.device),
               f"{split}/g_loss": g_loss.detach().mean()}
        if predicted_indices is not None and self.n_classes is not None:
            with torch.no_grad():
                perplexity, cluster_usage = measure_perplexity(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/cluster_usage"] = cluster_usage
        return loss, log
