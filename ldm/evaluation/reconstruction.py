"""Reconstruction quality of first-stage autoencoders: SSIM, MSE (0-255 scale) and PSNR."""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm.evaluation.images import to_uint8
from ldm.models.first_stage import FirstStage
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

MSE_FLOOR = 1e-10  # identical images would give infinite PSNR; cap it at 10*log10(255²/1e-10)

# SSIM settings of scikit-image's structural_similarity. "wang" is the index as Wang et al.
# (2004) define it (11x11 Gaussian window, sigma 1.5, population covariances), the one the
# paper cites; "uniform" is scikit-image's default (7x7 uniform window, sample covariances),
# which reads about 0.007 lower on real reconstruction pairs.
SSIM_SETTINGS: dict[str, dict[str, Any]] = {
    "wang": {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False},
    "uniform": {"win_size": 7, "gaussian_weights": False, "use_sample_covariance": True},
}
DEFAULT_SSIM = "wang"


def first_stage_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The autoencoder config inside a full config, an LDM config or a bare model config."""
    node = config.get("model", config) if isinstance(config.get("model"), Mapping) else config
    params = node.get("params") or {}
    if "first_stage_config" in params:  # a LatentDiffusion config
        node = params["first_stage_config"]
    if "target" not in node:
        raise KeyError(f"no autoencoder 'target' in config (keys: {list(node)})")
    return copy.deepcopy(dict(node))


def load_first_stage(config: Mapping[str, Any], ckpt: str | Path | None = None) -> torch.nn.Module:
    """Build the autoencoder for evaluation: no training loss, weights from ``ckpt``.

    ``ckpt`` may be a first-stage checkpoint (``loss.*`` keys are ignored), a full LDM
    checkpoint (``first_stage_model.*``) or None to use the config's own ``ckpt_path``.
    """
    cfg = first_stage_config(config)
    params = dict(cfg.get("params") or {})
    params["lossconfig"] = {"target": "torch.nn.Identity"}  # no LPIPS/discriminator needed
    if ckpt is not None:
        params["ckpt_path"] = str(ckpt)
    if not params.get("ckpt_path") and cfg["target"] != "ldm.models.autoencoder.IdentityFirstStage":
        raise ValueError(f"no weights for {cfg['target']}: pass a checkpoint (--ckpt)")
    if params.get("ckpt_path") and not Path(params["ckpt_path"]).is_file():
        raise FileNotFoundError(f"first-stage checkpoint not found: {params['ckpt_path']}")
    model = instantiate_from_config({"target": cfg["target"], "params": params})
    return model.eval()


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor,
                sample_posterior: bool = False) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(reconstruction, latent shape (C, h, w))`` of images ``x`` in [-1, 1].

    A first stage (``ldm.models.first_stage``) goes through its contract: VQ latents are quantized
    by ``decode``, KL ones are the posterior mode (or a sample). The training-only ``VQModel``
    encodes to its quantized latent.
    """
    if isinstance(model, FirstStage):
        z = model.encode_latent(x, sample=sample_posterior)
    else:  # VQModel: encode gives (quant, emb_loss, info)
        z = model.encode(x)[0]
    return model.decode(z), tuple(z.shape[1:])


def ssim_setting(name: str) -> dict[str, Any]:
    """The keyword arguments of an SSIM setting (see ``SSIM_SETTINGS``)."""
    if name not in SSIM_SETTINGS:
        raise ValueError(f"unknown SSIM setting {name!r}; choose from {sorted(SSIM_SETTINGS)}")
    return dict(SSIM_SETTINGS[name])


def image_metrics(original: np.ndarray, reconstruction: np.ndarray,
                  ssim: str = DEFAULT_SSIM) -> tuple[float, float, float]:
    """``(SSIM, MSE, PSNR)`` of two uint8 ``(H, W, 3)`` images on the 0-255 pixel scale."""
    from skimage.metrics import structural_similarity

    a, b = original.astype(np.float64), reconstruction.astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    psnr = 10 * math.log10(255.0**2 / max(mse, MSE_FLOOR))
    value = float(structural_similarity(original, reconstruction, channel_axis=2, data_range=255,
                                        **ssim_setting(ssim)))
    return value, mse, psnr


def evaluate_reconstructions(model: torch.nn.Module, dataset: Dataset, batch_size: int = 16,
                             sample_posterior: bool = False, num_workers: int = 0,
                             desc: str = "reconstructing",
                             ssim: str = DEFAULT_SSIM) -> dict[str, Any]:
    """Mean SSIM/MSE/PSNR over ``dataset`` ([0, 1] image tensors), with latent shape and f."""
    ssim_setting(ssim)  # fail before the first batch
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores: list[tuple[float, float, float]] = []
    latent = image = None
    for batch in tqdm(loader, desc=desc, unit="batch"):
        x = batch.to(device) * 2 - 1
        rec, latent = reconstruct(model, x, sample_posterior=sample_posterior)
        image = tuple(x.shape[1:])
        for orig, out in zip(to_uint8(x), to_uint8(rec)):
            scores.append(image_metrics(orig, out, ssim=ssim))
    if not scores:
        raise ValueError("no images to evaluate")
    arr = np.asarray(scores)
    return {"n": len(arr), "ssim": float(arr[:, 0].mean()), "ssim_std": float(arr[:, 0].std()),
            "mse": float(arr[:, 1].mean()), "mse_std": float(arr[:, 1].std()),
            "psnr": float(arr[:, 2].mean()), "psnr_std": float(arr[:, 2].std()),
            "image_size": f"{image[1]}x{image[2]}", "f": image[1] // latent[1],
            "latent_size": f"{latent[1]}x{latent[2]}x{latent[0]}"}
