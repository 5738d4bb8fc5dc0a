"""diffusionmodules."""
