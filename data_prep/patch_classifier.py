"""A patch classifier run on tiles for ``data_prep/tumor_til.py``: its spec (file, input size and
spacing, normalisation, class, activation), loading, and per-tile probabilities averaged over
the crops that cover a tile at the classifier's spacing."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ClassifierSpec:
    """A patch classifier and the preprocessing it expects."""

    path: str
    kind: str = "torchscript"  # or "torchvision"
    arch: str | None = None
    num_classes: int = 2
    input_size: int = 224
    mpp: float | None = None  # expected microns per pixel; None: resize the tile to input_size
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    class_index: int = 1
    activation: str = "softmax"  # or "sigmoid"
    batch_size: int = 64

    @classmethod
    def from_arg(cls, value: str, defaults: dict) -> ClassifierSpec:
        """A ``.json`` spec file (its keys override ``defaults``) or a model path."""
        p = Path(value)
        if p.suffix == ".json":
            try:
                spec = {**defaults, **json.loads(p.read_text(encoding="utf-8"))}
            except (OSError, ValueError) as e:
                raise ValueError(f"{p}: cannot read classifier spec ({e})") from e
            model_path = Path(spec["path"])
            spec["path"] = str(model_path if model_path.is_absolute() else p.parent / model_path)
        else:
            spec = {**defaults, "path": str(p)}
        try:
            return cls(**spec)
        except TypeError as e:
            raise ValueError(f"{value}: bad classifier spec ({e})") from e

    def describe(self) -> str:
        """Provenance string stored with the probabilities."""
        kind = f"{self.kind}/{self.arch}" if self.arch else self.kind
        return (f"classifier {Path(self.path).name} ({kind}, input {self.input_size}px at "
                f"{self.mpp or 'tile'} um/px, "
                f"class {self.class_index}, {self.activation})")


def load_classifier(spec: ClassifierSpec, device: str):
    """The classifier module in eval mode on ``device``."""
    import torch

    if not Path(spec.path).is_file():
        raise FileNotFoundError(f"classifier file not found: {spec.path}")
    if spec.kind == "torchscript":
        model = torch.jit.load(spec.path, map_location=device)
    elif spec.kind == "torchvision":
        import torchvision

        from ldm.util import load_checkpoint_into

        if not spec.arch:
            raise ValueError(f"{spec.path}: kind 'torchvision' needs 'arch' (e.g. resnet34)")
        model = torchvision.models.get_model(spec.arch, weights=None,
                                             num_classes=spec.num_classes)
        load_checkpoint_into(model, spec.path, name=spec.arch)
    else:
        raise ValueError(f"unknown classifier kind {spec.kind!r} (torchscript or torchvision)")
    return model.to(device).eval()


def crops(tile: np.ndarray, tile_mpp: float, spec: ClassifierSpec) -> list[np.ndarray]:
    """The tile resampled to the classifier's spacing, cut into input-size crops covering it."""
    from PIL import Image

    size = spec.input_size
    side = tile.shape[0] if spec.mpp is None else int(round(tile.shape[0] * tile_mpp / spec.mpp))
    if side <= size:  # the tile is no bigger than the field of view: one crop, resized
        return [np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BILINEAR))]
    img = np.asarray(Image.fromarray(tile).resize((side, side), Image.Resampling.BILINEAR))
    starts = np.round(np.linspace(0, side - size, math.ceil(side / size))).astype(int)
    return [img[y:y + size, x:x + size] for y in starts for x in starts]


def classify_tiles(model, spec: ClassifierSpec, tiles: list[np.ndarray], tile_mpp: float,
                   device: str) -> np.ndarray:
    """Probability of ``spec.class_index`` per tile (mean over the tile's crops)."""
    import torch

    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    pieces, owner = [], []
    for t, tile in enumerate(tiles):
        cs = crops(tile, tile_mpp, spec)
        pieces += cs
        owner += [t] * len(cs)
    probs = []
    with torch.inference_mode():
        for s in range(0, len(pieces), spec.batch_size):
            batch = torch.from_numpy(np.stack(pieces[s:s + spec.batch_size])).to(device)
            x = (batch.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            logits = model(x)
            p = (torch.softmax(logits, dim=1) if spec.activation == "softmax"
                 else torch.sigmoid(logits))
            probs.append(p[:, spec.class_index].float().cpu().numpy())
    flat = np.concatenate(probs) if probs else np.zeros(0)
    sums = np.bincount(owner, weights=flat, minlength=len(tiles))
    counts = np.bincount(owner, minlength=len(tiles))
    return (sums / np.maximum(counts, 1)).astype(np.float32)
