"""Probability distributions used by the KL autoencoder and the diffusion losses."""
from ldm.modules.distributions.distributions import (
    AbstractDistribution,
    DiagonalGaussianDistribution,
    DiracDistribution,
    normal_kl,
)

__all__ = ["AbstractDistribution", "DiagonalGaussianDistribution", "DiracDistribution",
           "normal_kl"]
