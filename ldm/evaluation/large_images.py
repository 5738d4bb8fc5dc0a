"""Metrics of large generated images: seam score and Crop-FID (random crops vs real patches).

The seam score compares the mean gradient magnitude across the window borders of joint sampling
with the mean inside the windows: 1 means the borders are invisible to this measure, above 1
they show. Crop-FID draws random ``crop``-px crops of large samples and compares them with real
patches through :mod:`ldm.evaluation.fid`'s Inception features and the Fréchet distance of
:mod:`ldm.evaluation.metrics`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def _gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absolute differences along x ``(H, W-1)`` and y ``(H-1, W)``, mean over channels."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[..., None]
    return (np.abs(np.diff(img, axis=1)).mean(axis=2), np.abs(np.diff(img, axis=0)).mean(axis=2))


def seam_score(image: np.ndarray, borders_x: Sequence[int], borders_y: Sequence[int],
               period: int = 1) -> dict[str, float]:
    """Mean gradient across window borders vs inside windows.

    ``borders_x``: pixel columns where a window starts or ends (the step between column
    ``b - 1`` and ``b`` crosses the border); ``borders_y`` likewise for rows. ``period``: the
    decoder's upsampling; the inside steps compared are those at the same phase (between two
    latent pixels, like every window border), so the decoder's own latent grid does not count
    as a seam. Returns ``{"border", "inside", "ratio"}`` (ratio = border / inside).
    """
    gx, gy = _gradients(image)
    bx = sorted({int(b) - 1 for b in borders_x if 0 < b <= gx.shape[1]})
    by = sorted({int(b) - 1 for b in borders_y if 0 < b <= gy.shape[0]})
    if not bx and not by:
        raise ValueError("no window border inside the image (one window: nothing to measure)")
    inside_x = np.arange(gx.shape[1]) % period == period - 1
    inside_x[bx] = False
    inside_y = np.arange(gy.shape[0]) % period == period - 1
    inside_y[by] = False
    border = np.concatenate([gx[:, bx].ravel(), gy[by, :].ravel()]).mean()
    inside = np.concatenate([gx[:, inside_x].ravel(), gy[inside_y, :].ravel()])
    if inside.size == 0:
        raise ValueError("no step inside the windows to compare the borders with")
    inside = inside.mean()
    return {"border": float(border), "inside": float(inside),
            "ratio": float(border / inside) if inside > 0 else float("inf")}


def window_borders(starts: Sequence[int], window: int, length: int, factor: int) -> list[int]:
    """Pixel positions of the window edges along one axis (canvas edges excluded)."""
    edges = {s * factor for s in starts} | {(s + window) * factor for s in starts}
    return sorted(e for e in edges if 0 < e < length * factor)


def random_crops(images: Sequence[np.ndarray], n: int, crop: int = 256,
                 seed: int = 0) -> list[np.ndarray]:
    """``n`` random ``crop`` x ``crop`` crops spread over ``images`` (seeded, uniform positions)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = images[k % len(images)]
        h, w = img.shape[:2]
        if h < crop or w < crop:
            raise ValueError(f"image of {w}x{h} px is smaller than the {crop}-px crop")
        y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
        out.append(img[y:y + crop, x:x + crop])
    return out


class ArrayImages(Dataset):
    """uint8 ``(H, W, 3)`` arrays as [0, 1] ``(3, H, W)`` tensors (FID's input)."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).float() / 255


def crop_fid(images: Sequence[np.ndarray], real: Dataset, n_crops: int = 1000,
             crop: int = 256, seed: int = 0, dims: int = 2048,
             inception_weights: str | Path | None = None, batch_size: int = 50,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """Crop-FID of large ``images`` against ``real`` patches (a [0, 1] tensor dataset)."""
    from ldm.evaluation.fid import extract_features, load_inception
    from ldm.evaluation.metrics import feature_statistics, frechet_distance

    model = load_inception(dims, weights=inception_weights).to(device)
    crops = ArrayImages(random_crops(images, n_crops, crop, seed))
    fake = extract_features(model, crops, batch_size, desc="crop features")
    ref = extract_features(model, real, batch_size, desc="real features")
    fid = frechet_distance(*feature_statistics(fake), *feature_statistics(ref))
    return {"crop_fid": float(fid), "n_crops": n_crops, "crop": crop, "n_real": len(real),
            "dims": dims, "seed": seed}
