"""FID with pytorch-fid's InceptionV3: weights, features and pytorch-fid's statistics files.

The formulas (statistics, Fréchet distance, KID) live in :mod:`ldm.evaluation.metrics`.
"""
from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.nn.functional import adaptive_avg_pool2d
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm.optional import require

logger = logging.getLogger(__name__)

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
DIMS = (64, 192, 768, 2048)


class InceptionWeightsNotFound(FileNotFoundError):
    """The FID Inception weights are neither given, cached nor downloadable."""


def _pytorch_fid_inception() -> ModuleType:
    """``pytorch_fid.inception``, or an error naming the ``[eval]`` extra."""
    return require("pytorch_fid.inception", "eval", "FID and KID (pytorch-fid's Inception)")


def default_inception_weights_path() -> Path:
    """Where pytorch-fid's download lands: ``$TORCH_HOME/hub/checkpoints/<FID_WEIGHTS_FILE>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def _missing_weights_message(path: Path, reason: str) -> str:
    url = _pytorch_fid_inception().FID_WEIGHTS_URL
    return (f"FID Inception weights not available ({reason}).\n"
            f"  needed file: {FID_WEIGHTS_FILE} (pytorch-fid's port of TF Inception 2015-12-05)\n"
            f"  looked at:   {path}\n"
            f"  fix: on a machine with internet run\n"
            f"         wget {url}\n"
            f"       then copy the file to {default_inception_weights_path()} "
            f"(or set TORCH_HOME), or pass --inception-weights /path/to/{FID_WEIGHTS_FILE}")


def resolve_inception_state_dict(weights: str | Path | None = None,
                                 allow_download: bool = True) -> dict[str, torch.Tensor]:
    """FID Inception weights: ``weights`` file, else the torch hub cache, else download."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise InceptionWeightsNotFound(_missing_weights_message(path, "file does not exist"))
    else:
        path = default_inception_weights_path()
        if not path.is_file():
            if not allow_download:
                raise InceptionWeightsNotFound(_missing_weights_message(path, "not in cache"))
            url = _pytorch_fid_inception().FID_WEIGHTS_URL
            try:
                logger.info("downloading FID Inception weights to %s", path)
                return torch.hub.load_state_dict_from_url(url, progress=True,
                                                          map_location="cpu")
            except Exception as e:  # offline, proxy, partial file: all get the same advice
                raise InceptionWeightsNotFound(
                    _missing_weights_message(path, f"download failed: {e}")) from e
    from ldm.checkpoint import load_torch_file

    sd = load_torch_file(path, trust=False)  # plain tensors: never a full pickle
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state_dict (mapping of tensors), got {type(sd)}")
    return dict(sd)


@contextmanager
def _inception_weights(state_dict: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Let pytorch-fid build its own network but take weights from ``state_dict``.

    pytorch-fid always fetches its weights by URL inside ``fid_inception_v3``; swapping that
    loader for the duration of the constructor keeps the architecture exactly pytorch-fid's.
    """
    pfi = _pytorch_fid_inception()
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: dict(state_dict)
    try:
        yield
    finally:
        pfi.load_state_dict_from_url = original


def load_inception(dims: int = 2048, weights: str | Path | None = None,
                   allow_download: bool = True,
                   device: torch.device | str | None = None) -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3`` returning the block for ``dims`` features, in eval mode."""
    InceptionV3 = _pytorch_fid_inception().InceptionV3
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        choices = sorted(InceptionV3.BLOCK_INDEX_BY_DIM)
        raise ValueError(f"dims must be one of {choices}, got {dims}")
    sd = resolve_inception_state_dict(weights, allow_download=allow_download)
    try:
        with _inception_weights(sd):
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except RuntimeError as e:
        raise ValueError(f"Inception weights {weights or default_inception_weights_path()} do "
                         f"not fit pytorch-fid's FID Inception: {e}") from e
    return model.eval().to(device or "cpu")


@torch.no_grad()
def extract_features(model: torch.nn.Module, dataset: Dataset, batch_size: int = 50,
                     num_workers: int = 0, desc: str = "inception features") -> np.ndarray:
    """Inception features ``(N, dims)`` (float64) of images given as [0, 1] ``(3, H, W)`` tensors.

    Same computation as pytorch-fid's ``get_activations``: spatial average pooling for the
    non-2048 blocks. Runs on the model's device.
    """
    if len(dataset) == 0:
        raise ValueError("no images to extract features from")
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=False,
                        num_workers=num_workers)
    chunks = []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        if isinstance(batch, (list, tuple)):  # (image, label) datasets
            batch = batch[0]
        pred = model(batch.to(device))[0]
        if pred.shape[2] != 1 or pred.shape[3] != 1:
            pred = adaptive_avg_pool2d(pred, output_size=(1, 1))
        chunks.append(pred.squeeze(3).squeeze(2).cpu().numpy().astype(np.float64))
    return np.concatenate(chunks, axis=0)


def inception_protocol(model: torch.nn.Module, dims: int, center_crop: int | None,
                       resize: int | None) -> dict[str, Any]:
    """What must agree between reference statistics and a scoring (``evaluate.py``'s keys)."""
    from ldm.evaluation.features import state_dict_hash

    return {"extractor": f"inception:{dims}", "weights_sha256": state_dict_hash(model),
            "center_crop": center_crop, "resize": resize}


def features_path(stats_path: str | Path) -> Path:
    """Sidecar file with the raw features next to a statistics npz (used for KID)."""
    stats_path = Path(stats_path)
    stem = stats_path.name[:-4] if stats_path.name.endswith(".npz") else stats_path.name
    return stats_path.with_name(f"{stem}.features.npy")


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray,
                    features: np.ndarray | None = None) -> Path:
    """Write ``mu``/``sigma`` exactly as pytorch-fid's ``--save-stats`` (atomically).

    float64, as pytorch-fid's own statistics (its activations array is float64), so either
    tool reads the other's files. Raw features, when given, go to a sidecar
    ``<name>.features.npy`` for KID.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics file must end in .npz (pytorch-fid format): {path}")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, mu=np.asarray(mu, dtype=np.float64),
                        sigma=np.asarray(sigma, dtype=np.float64))
    os.replace(tmp, path)
    if features is not None:
        fpath = features_path(path)
        ftmp = fpath.with_name(f".{fpath.stem}.{os.getpid()}.tmp.npy")
        np.save(ftmp, features)
        os.replace(ftmp, fpath)
    return path


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(mu, sigma, features or None)`` of a pytorch-fid npz (and its features sidecar)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    try:
        with np.load(path) as f:
            missing = [k for k in ("mu", "sigma") if k not in f]
            if missing:
                raise KeyError(f"{path}: missing {missing} (expected pytorch-fid npz with mu, "
                               "sigma)")
            mu, sigma = f["mu"][:], f["sigma"][:]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable statistics file ({path.stat().st_size} bytes; "
                         f"expected pytorch-fid's .npz with mu, sigma): {e}") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a finite mean "
                         "vector (d,) and covariance (d, d)")
    fpath = features_path(path)
    features = None
    if fpath.is_file():
        try:
            features = np.load(fpath)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{fpath}: not a readable features file (.npy): {e}") from None
        if features.ndim != 2 or features.shape[1] != d:
            raise ValueError(f"{fpath}: features {features.shape} do not match mu ({d} dims)")
    return mu, sigma, features
