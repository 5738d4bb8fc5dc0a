"""Autoencoder training losses (CompVis path ``ldm.modules.losses.LPIPSWithDiscriminator``)."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.lpips import LPIPS, MissingWeightsError
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["LPIPS", "LPIPSWithDiscriminator", "MissingWeightsError", "VQLPIPSWithDiscriminator"]
