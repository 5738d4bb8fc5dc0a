"""Cache first-stage latents of a training store so that LDM training skips the frozen encoder.

The frozen VQ encoder costs a large share of a PathLDM training step and gives the same output
for the same pixels every epoch. :func:`cache_latents` encodes every whole tile once (and, with
``flips``, its horizontally/vertically flipped versions, so that flip augmentation stays exact)
into ``latents`` ``(N, V, C, h, w)`` float16, V = 4 (none, h, v, hv) or 1: the first stage's
``encode_moments`` (VQ: the pre-quantization latent; KL: the posterior's mean and log-variance,
which training samples as it does from images; format 2, format 1 held a KL posterior's mode).
The training dataset
(:class:`ldm.data.tcga.TCGAPatchDataset` with ``latents_path``) then returns ``batch["latent"]``.

Writes are atomic (``OUT.tmp`` renamed when complete) and resumable: an interrupted run
continues from the last flushed batch.
"""
from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.data.store import IMAGES, LATENTS, create_latents, decode_jpeg, source_id

logger = logging.getLogger(__name__)


def _tiles(images: h5py.Dataset, start: int, stop: int) -> torch.Tensor:
    """Decoded tiles ``[start, stop)`` as ``(B, 3, H, W)`` in [-1, 1]."""
    arrays = [decode_jpeg(images[i]) for i in range(start, stop)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def flip_variants(x: torch.Tensor, flips: bool) -> torch.Tensor:
    """``(B, V, 3, H, W)``: V = [x, h-flip, v-flip, hv-flip] (index 2*v + h) or [x]."""
    if not flips:
        return x[:, None]
    return torch.stack([x, x.flip(-1), x.flip(-2), x.flip(-2, -1)], dim=1)


@torch.no_grad()
def encode(first_stage: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What training draws latents from (``encode_moments``, see ``ldm.models.first_stage``).

    VQ: the pre-quantization latent; KL: the posterior's mean and log-variance, so that
    training from the cache samples the posterior exactly as training from images does.
    """
    return first_stage.encode_moments(x)


def cache_latents(store: str | Path, first_stage: torch.nn.Module, out: str | Path,
                  batch_size: int = 32, flips: bool = True,
                  device: str | torch.device | None = None) -> Path:
    """Encode every tile of ``store`` with ``first_stage`` into ``out`` (see module docstring)."""
    store, out = Path(store), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    device = torch.device(device) if device is not None else next(first_stage.parameters()).device
    first_stage = first_stage.to(device).eval()
    n_var = 4 if flips else 1
    with h5py.File(store, "r") as src:
        images = src[IMAGES]
        n, source = len(images), source_id(src)
        if n == 0:
            raise ValueError(f"{store} has no images")
        first = _tiles(images, 0, 1)
        shape = (n, n_var, *encode(first_stage, first.to(device)).shape[1:])
        with _open_output(tmp, shape, source, int(first.shape[-1])) as f:
            done = int(f.attrs["n_done"])
            if done:
                logger.info("%s: resuming after %d of %d tiles", tmp, done, n)
            bar = tqdm(total=n, initial=done, desc=f"latents {store.name}", unit="tile")
            for start in range(done, n, batch_size):
                stop = min(n, start + batch_size)
                x = flip_variants(_tiles(images, start, stop), flips).to(device)
                z = encode(first_stage, x.flatten(0, 1)).unflatten(0, (stop - start, n_var))
                f[LATENTS][start:stop] = z.float().cpu().numpy().astype(np.float16)
                f.attrs["n_done"] = stop
                f.flush()
                bar.update(stop - start)
            bar.close()
    tmp.replace(out)
    logger.info("wrote %s: latents %s", out, shape)
    return out


def _open_output(tmp: Path, shape: tuple, source: str, image_size: int) -> h5py.File:
    """The temporary output, reused when it belongs to the same job, else created afresh."""
    if tmp.is_file():
        f = h5py.File(tmp, "a")
        same = (LATENTS in f and tuple(f[LATENTS].shape) == shape
                and f.attrs.get("source") == source)
        if same:
            return f
        f.close()
        logger.warning("%s belongs to another job; starting over", tmp)
        tmp.unlink()
    f = h5py.File(tmp, "w")
    create_latents(f, shape, source, image_size)
    return f
