"""Classification Accuracy Score: ResNet-34 trained on (synthetic) patches, tested on real ones."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm import tqdm

from ldm.data.captions import levels_from_caption, prob_to_level
from ldm.evaluation.images import ImageDataset, PilTransform, SplitStore, is_store

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LEVELS = {"low": 0, "high": 1}


def synthetic_records(folder: str | Path) -> list[dict[str, Any]]:
    """Generated images of a folder with their conditioning, from ``samples.jsonl``
    (``fid.py generate``) or ``metadata.json`` (``sample.py``)."""
    folder = Path(folder)
    jsonl, meta = folder / "samples.jsonl", folder / "metadata.json"
    if jsonl.is_file():
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    elif meta.is_file():
        records = json.loads(meta.read_text()).get("images", [])
    else:
        raise FileNotFoundError(f"{folder}: no samples.jsonl or metadata.json describing the "
                                "generated images (write them with fid.py generate or sample.py)")
    return records


def synthetic_labels(folder: str | Path, key: str = "tumor") -> tuple[list[Path], list[int]]:
    """Existing images of a generated folder and the ``key`` level (low 0 / high 1) they were
    generated with (from the record, else from the caption's ``"<tumor> tumor; <til> til;"``)."""
    folder = Path(folder)
    files, labels = [], []
    for rec in synthetic_records(folder):
        path = folder / rec["file"]
        if not path.is_file():
            continue
        level = rec.get(key)
        if level is None:
            levels = levels_from_caption(rec.get("caption") or rec.get("prompt") or "")
            level = None if levels is None else levels[0 if key == "tumor" else 1]
        if level is None:
            raise ValueError(f"{folder}: no {key} level for {rec['file']} (caption not in "
                             "training format and no level recorded)")
        files.append(path)
        labels.append(LEVELS[str(level).lower()])
    if not files:
        raise ValueError(f"{folder}: none of the recorded images exists")
    return files, labels


def synthetic_stores(path: str | Path) -> list[SplitStore] | None:
    """Generated split stores at ``path`` (``fid.py generate --format store``): one ``.h5``
    file, or the ``part-*.h5`` files of a folder; None when ``path`` holds neither."""
    path = Path(path)
    if is_store(path):
        return [SplitStore(path)]
    parts = sorted(path.glob("part-*.h5")) if path.is_dir() else []
    if not parts:
        return None
    meta = path / "generation.json"
    if meta.is_file():
        settings = json.loads(meta.read_text())
        expected = math.ceil(int(settings.get("n", 0)) / int(settings.get("part_size", 1)))
        if len(parts) < expected:
            logger.warning("%s: %d of %d parts present (generation incomplete?)", path,
                           len(parts), expected)
    return [SplitStore(p) for p in parts]


def synthetic_datasets(path: str | Path, transform: PilTransform | None) -> list[Dataset]:
    """Labelled datasets of generated patches: store parts read lazily row by row (the paper's
    millions of patches stream from disk), or a folder of PNGs with its records."""
    stores = synthetic_stores(path)
    if stores is None:
        files, labels = synthetic_labels(path)
        return [ImageDataset(files, labels=labels, transform=transform)]
    datasets: list[Dataset] = []
    for store in stores:  # the generated level is stored as probability 0 (low) or 1 (high)
        rows, y = real_labels(store)
        datasets.append(ImageDataset(store, indices=rows, labels=y, transform=transform))
    logger.info("%s: %d generated patches in %d store parts", path,
                sum(len(d) for d in datasets), len(stores))
    return datasets


def real_labels(store: SplitStore, key: str = "tumor", max_n: int | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a split store with a known ``<key>_prob`` and their level (``prob_to_level``)."""
    probs = store.array(f"{key}_prob")
    rows = np.flatnonzero(np.isfinite(probs))
    if max_n is not None and max_n < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_n, replace=False))
    if len(rows) == 0:
        raise ValueError(f"{store.path}: no patch has a finite {key}_prob")
    return rows, np.array([prob_to_level(p) for p in probs[rows]], dtype=np.int64)


def labelled_dataset(real: SplitStore | None, real_rows: np.ndarray | None,
                     real_y: np.ndarray | None, synthetic: Sequence[tuple[list[Path], list[int]]],
                     transform: PilTransform | None, extra: Sequence[Dataset] = ()) -> Dataset:
    """Real (store rows), synthetic (files) and ``extra`` labelled images, concatenated."""
    parts: list[Dataset] = []
    if real is not None:
        parts.append(ImageDataset(real, indices=real_rows, labels=real_y, transform=transform))
    for files, labels in synthetic:
        parts.append(ImageDataset(files, labels=labels, transform=transform))
    parts += list(extra)
    if not parts:
        raise ValueError("no training data")
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def resnet34(num_classes: int = 2, weights: str | Path | None = None) -> nn.Module:
    """torchvision ResNet-34 with a ``num_classes`` head; ImageNet weights from ``weights``."""
    import torchvision

    model = torchvision.models.resnet34(weights=None)
    if weights is not None:
        from ldm.checkpoint import load_torch_file

        sd = load_torch_file(weights, trust=False)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"{weights} is not a torchvision ResNet-34 state_dict: {e}") from e
        logger.info("ResNet-34 initialised from %s", weights)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def imagenet_weights_path(explicit: str | Path | None = None) -> Path | None:
    """``explicit`` (must exist), else torchvision's cached ImageNet ResNet-34 file, else None."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained weights not found: {path}")
        return path
    from torchvision.models import ResNet34_Weights

    name = Path(ResNet34_Weights.IMAGENET1K_V1.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        return cached
    logger.warning("ImageNet ResNet-34 weights not found (%s); training from random init, unlike "
                   "the paper. Download %s there or pass --pretrained PATH", cached,
                   ResNet34_Weights.IMAGENET1K_V1.url)
    return None


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _flip(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal and vertical flips per image (patches have no orientation)."""
    b = x.shape[0]
    h = torch.rand(b, device=x.device) < 0.5
    v = torch.rand(b, device=x.device) < 0.5
    x = torch.where(h.view(b, 1, 1, 1), x.flip(3), x)
    return torch.where(v.view(b, 1, 1, 1), x.flip(2), x)


def train_classifier(model: nn.Module, dataset: Dataset, epochs: int = 40, batch_size: int = 256,
                     lr: float = 1e-3, milestones: Sequence[int] = (20, 30), gamma: float = 0.1,
                     seed: int = 0, num_workers: int = 0, flip: bool = False) -> list[float]:
    """Adam + step decay (the paper's CAS schedule); returns the mean loss of each epoch."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        drop_last=len(dataset) > batch_size,  # no 1-image BatchNorm batches
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    losses = []
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
            x, y = x.to(device), y.to(device)
            if flip:
                x = _flip(x)
            loss = nn.functional.cross_entropy(model(_normalize(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(y), count + len(y)
        sched.step()
        losses.append(total / max(count, 1))
        logger.info("epoch %d/%d: loss %.4f, lr %.2g", epoch + 1, epochs, losses[-1],
                    sched.get_last_lr()[0])
    return losses


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                        num_workers: int = 0, num_classes: int = 2) -> dict[str, Any]:
    """Accuracy (%), per-class recall (%) and balanced accuracy on labelled images."""
    device = next(model.parameters()).device
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for x, y in tqdm(loader, desc="evaluating", unit="batch", leave=False):
        pred = model(_normalize(x.to(device))).argmax(1).cpu().numpy()
        np.add.at(confusion, (y.numpy(), pred), 1)
    n = int(confusion.sum())
    recall = [100.0 * confusion[c, c] / confusion[c].sum() if confusion[c].sum() else math.nan
              for c in range(num_classes)]
    present = [r for r in recall if not math.isnan(r)]
    return {"accuracy": 100.0 * np.trace(confusion) / max(n, 1), "n": n,
            "recall": recall, "balanced_accuracy": float(np.mean(present)) if present else None,
            "confusion": confusion.tolist()}
