"""Prompt adherence in feature spaces: text-image similarity and a tumor/TIL linear probe.

- Text-image: cosine similarity of each image's embedding with its own caption's embedding (a
  CLIP-like extractor, PLIP by default), for samples and for real patches with their captions,
  and for the samples with shuffled captions as a floor.
- Probe: logistic regressions on standardised features of real training patches predict the
  tumor and the TIL level; applied to samples they give the accuracy against the levels the
  samples were asked for, and on held-out real patches the probe's own ceiling.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

TARGETS = ("tumor", "til")


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(N, D)`` arrays."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def text_image_similarity(images: np.ndarray, texts: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Mean cosine similarity with own captions and with shuffled captions (the floor)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} image embeddings but {len(texts)} caption embeddings")
    own = cosine_rows(images, texts)
    perm = np.random.default_rng(seed).permutation(len(texts))
    shuffled = cosine_rows(images, texts[perm])
    return {"n": len(own), "own_caption": float(own.mean()),
            "own_caption_std": float(own.std()), "shuffled_caption": float(shuffled.mean())}


class LinearProbe:
    """Multinomial logistic regression on standardised features (L2, full-batch L-BFGS)."""

    def __init__(self, l2: float = 1e-3, max_iter: int = 200) -> None:
        self.l2, self.max_iter = l2, max_iter

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearProbe:
        """Fit on features ``x`` and integer labels ``y``."""
        self.classes = np.unique(y)
        if len(self.classes) < 2:
            raise ValueError(f"a probe needs at least two classes, got {self.classes.tolist()}")
        self.mean, self.std = x.mean(axis=0), x.std(axis=0) + 1e-8
        xt = torch.from_numpy((x - self.mean) / self.std)
        yt = torch.from_numpy(np.searchsorted(self.classes, y))
        w = torch.zeros(x.shape[1], len(self.classes), dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(self.classes), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = w.detach(), b.detach()
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels of features ``x``."""
        logits = torch.from_numpy((x - self.mean) / self.std) @ self.w + self.b
        return self.classes[logits.argmax(dim=1).numpy()]


def level_labels(levels: Sequence[tuple[str, str] | None], target: str) -> np.ndarray:
    """0/1 (low/high; -1 unknown) of ``target`` for each ``(tumor, til)`` level pair."""
    col = TARGETS.index(target)
    return np.array([-1 if lv is None else int(lv[col] == "high") for lv in levels])


def probe_adherence(train: np.ndarray, train_levels: Sequence[Any], held_out: np.ndarray,
                    held_out_levels: Sequence[Any], samples: np.ndarray,
                    sample_levels: Sequence[Any]) -> dict[str, Any]:
    """Per target: the probe's held-out real accuracy (ceiling) and its accuracy on samples."""
    out: dict[str, Any] = {}
    for target in TARGETS:
        ytr, yho = level_labels(train_levels, target), level_labels(held_out_levels, target)
        ysa = level_labels(sample_levels, target)
        known = ytr >= 0
        if len(np.unique(ytr[known])) < 2:
            out[target] = {"skipped": "the training patches have a single level"}
            continue
        probe = LinearProbe().fit(train[known], ytr[known])
        res: dict[str, Any] = {"n_train": int(known.sum())}
        for name, x, y in (("real_held_out", held_out, yho), ("samples", samples, ysa)):
            k = y >= 0
            res[f"{name}_n"] = int(k.sum())
            res[f"{name}_accuracy"] = (float((probe.predict(x[k]) == y[k]).mean())
                                       if k.any() else None)
        res["chance"] = float(max(np.mean(ytr[known]), 1 - np.mean(ytr[known])))
        out[target] = res
    return out
