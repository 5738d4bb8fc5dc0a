"""Evaluation helpers: image sources, Inception features (FID/KID), sampling, reconstruction."""
