"""PathLDM: a CompVis-compatible latent diffusion package for histopathology."""

__version__ = "0.1.0"
