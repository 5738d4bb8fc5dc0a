"""Diagonal Gaussian posterior of the KL autoencoder and the Gaussian KL helper (CompVis path)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class AbstractDistribution:
    """Interface: ``sample()`` and ``mode()``."""

    def sample(self) -> Tensor:
        raise NotImplementedError

    def mode(self) -> Tensor:
        raise NotImplementedError


class DiracDistribution(AbstractDistribution):
    """Point mass at ``value``."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def sample(self) -> Tensor:
        return self.value

    def mode(self) -> Tensor:
        return self.value


class DiagonalGaussianDistribution(AbstractDistribution):
    """Gaussian with mean and log-variance split from ``parameters`` along dim 1.

    The log-variance is clamped to [-30, 20]; ``deterministic`` gives zero variance.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw ``mean + std * eps``."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) summed over (C, H, W); ``other=None`` means N(0, I)."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar,
                                   dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var
                               + self.var / other.var - 1.0 - self.logvar + other.logvar,
                               dim=[1, 2, 3])

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of ``sample`` summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar
                               + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def mode(self) -> Tensor:
        return self.mean


def normal_kl(mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float,
              logvar2: Tensor | float) -> Tensor:
    """Elementwise KL between two Gaussians given means and log-variances (broadcasting)."""
    tensor = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, Tensor)), None)
    if tensor is None:
        raise TypeError("at least one argument must be a Tensor")
    logvar1, logvar2 = (x if isinstance(x, Tensor) else torch.tensor(x).to(tensor)
                        for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))
