"""The first-stage contract: what latent diffusion, latent caching and sampling ask of an
autoencoder.

A first stage maps images to *latents* and back. Its encoder output may be a distribution: the
KL autoencoder encodes to a diagonal Gaussian (``moments`` = mean and log-variance stacked on
the channels, as CompVis names them), a VQ first stage to one point (its pre-quantization
latent). Training draws a latent from the moments (``sample=True``: the KL posterior is
sampled, as the original LatentDiffusion does), whether the moments come from the encoder in
the same step or from a cache written once by ``scripts/cache_latents.py``: both paths draw
with the same random numbers and give the same latent.

``VQModelInterface``, ``AutoencoderKL`` and ``IdentityFirstStage`` implement it
(``ldm.models.autoencoder``); the training-only ``VQModel`` has the encoding half
(``encode_moments``), which is all a latent cache needs.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class FirstStage(Protocol):
    """Images in [-1, 1] ``(B, 3, H, W)`` <-> unscaled latents ``(B, C, h, w)``."""

    def encode_moments(self, x: Tensor) -> Tensor:
        """Deterministic encoder output a latent is drawn from (what a latent cache stores)."""

    def latent_from_moments(self, moments: Tensor, sample: bool) -> Tensor:
        """A latent from :meth:`encode_moments`' output: a sample, or the mode."""

    def encode_latent(self, x: Tensor, sample: bool) -> Tensor:
        """``latent_from_moments(encode_moments(x), sample)``."""

    def decode(self, z: Tensor, force_not_quantize: bool = False) -> Tensor:
        """Latent -> image; a VQ first stage quantizes ``z`` first unless told not to."""
