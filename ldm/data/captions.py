"""Tumor/TIL levels, captions and class labels shared by data prep, training and evaluation.

The one owner of the caption format ``"<tumor> tumor; <til> til; <summary>"``, its inverse, the
class-label formula and its inverse, the guidance-dropout rule of the original dataset, and the
batch-like dicts (``{"caption", "class_label", "summary", ...}``) that
``LatentDiffusion.get_conditioning`` reads.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LEVEL_NAMES = {2: ("low", "high"), 3: ("low", "medium", "high")}
UNCONDITIONAL_CLASS = 4


def prob_to_level(p: float, n_levels: int = 2) -> int:
    """Ordinal level of a probability: ``int(min(p, 1 - 1e-6) * n_levels)``.

    The clamp keeps p = 1.0 in the top level (the original ``int(p * n_levels)`` overflowed).
    """
    p = float(p)
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    return int(min(p, 1.0 - 1e-6) * n_levels)


def level_name(level: int, n_levels: int = 2) -> str:
    """Lowercase name of a level (``low``/``high`` for two levels)."""
    names = LEVEL_NAMES.get(n_levels)
    if names is None:
        raise ValueError(f"no level names for n_levels={n_levels}; use 2 or 3")
    return names[level]


def caption_from_levels(tumor: str, til: str, summary: str) -> str:
    """``"{tumor} tumor; {til} til; {summary}"``, the training caption format."""
    return f"{tumor.lower()} tumor; {til.lower()} til; {summary.strip()}"


def build_caption(tumor_prob: float, til_prob: float, summary: str, n_levels: int = 2) -> str:
    """Caption of a patch from its probabilities and its slide's summary."""
    tumor = level_name(prob_to_level(tumor_prob, n_levels), n_levels)
    til = level_name(prob_to_level(til_prob, n_levels), n_levels)
    return caption_from_levels(tumor, til, summary)


def class_label_from_level_ids(tumor: int, til: int) -> int:
    """Baseline class of two-level ids: 0 low/low, 1 low tumor/high TIL, 2 high/low, 3 high/high."""
    return 2 * int(tumor) + int(til)


def levels_of_class(label: int) -> tuple[str, str]:
    """``(tumor, til)`` level names of a baseline class label 0-3 (inverse of the formula)."""
    if not 0 <= int(label) < UNCONDITIONAL_CLASS:
        raise ValueError(f"class label {label} has no tumor/TIL levels (0-3)")
    return LEVEL_NAMES[2][int(label) // 2], LEVEL_NAMES[2][int(label) % 2]


def class_label(tumor_prob: float, til_prob: float) -> int:
    """Baseline class: 0 low/low, 1 low tumor/high TIL, 2 high/low, 3 high/high."""
    return class_label_from_level_ids(prob_to_level(tumor_prob, 2), prob_to_level(til_prob, 2))


def legacy_class_label(tumor_prob: float, til_prob: float) -> int:
    """The original class-conditional dataset's label: high when ``p > 0.5`` (so 0.5 is low).

    Differs from :func:`class_label` only at exactly 0.5; used by ``legacy_class_label``.
    """
    return class_label_from_level_ids(float(tumor_prob) > 0.5, float(til_prob) > 0.5)


def class_label_from_levels(tumor: str, til: str) -> int:
    """Class label from level names (``low``/``high``)."""
    levels = {"low": 0, "high": 1}
    try:
        return class_label_from_level_ids(levels[tumor.lower()], levels[til.lower()])
    except KeyError as e:
        raise ValueError(f"levels must be 'low' or 'high', got tumor={tumor!r}, til={til!r}") from e


_CAPTION_RE = re.compile(r"^\s*(low|high) tumor;\s*(low|high) til;\s?(.*)$",
                         re.IGNORECASE | re.DOTALL)


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """``(tumor, til, summary)`` of a training-format caption (inverse of
    :func:`caption_from_levels`), or None when it does not start with both levels."""
    m = _CAPTION_RE.match(caption)
    return (m.group(1).lower(), m.group(2).lower(), m.group(3).strip()) if m else None


def levels_from_caption(caption: str) -> tuple[str, str] | None:
    """``(tumor, til)`` level names of a training-format caption, or None."""
    parsed = parse_caption(caption)
    return parsed[:2] if parsed else None


def drop_decisions(u: Sequence[float] | np.ndarray, rate: float,
                   exempt: Sequence[bool] | None = None) -> np.ndarray:
    """Classifier-free-guidance dropout of a batch: ``u < rate``, never where ``exempt``.

    ``u`` are uniform draws, one per sample. ``exempt`` marks samples that keep their
    conditioning whatever the draw (the original PathLDM never dropped a high-TIL caption).
    """
    drop = np.asarray(u, dtype=np.float64) < float(rate)
    if exempt is not None:
        drop &= ~np.asarray(exempt, dtype=bool)
    return drop


def levels_batch(levels: Sequence[tuple[str, str]], summaries: Sequence[str] | str = ""
                 ) -> dict[str, Any]:
    """Batch-like dict of ``(tumor, til)`` level pairs and summaries for ``get_conditioning``.

    Fields: ``caption`` (training format), ``class_label`` (LongTensor), ``summary``,
    ``tumor``, ``til``. A single summary string is used for every sample.
    """
    import torch

    summaries = [summaries] * len(levels) if isinstance(summaries, str) else list(summaries)
    if len(summaries) != len(levels):
        raise ValueError(f"{len(levels)} level pairs for {len(summaries)} summaries")
    pairs = [(t.lower(), i.lower()) for t, i in levels]
    labels = [class_label_from_levels(t, i) for t, i in pairs]
    return {"caption": [caption_from_levels(t, i, s) for (t, i), s in zip(pairs, summaries)],
            "class_label": torch.tensor(labels, dtype=torch.long),
            "summary": [s.strip() for s in summaries],
            "tumor": [t for t, _ in pairs], "til": [i for _, i in pairs]}


def captions_batch(captions: Sequence[str]) -> dict[str, Any]:
    """Batch-like dict of captions: ``caption``, plus ``class_label``/``summary``/``tumor``/
    ``til`` parsed from training-format captions (class 4, whole caption as summary, levels
    None where a caption has no levels)."""
    import torch

    captions = [str(c) for c in captions]
    parsed = [parse_caption(c) for c in captions]
    return {"caption": captions,
            "class_label": torch.tensor([class_label_from_levels(*p[:2]) if p
                                         else UNCONDITIONAL_CLASS for p in parsed],
                                        dtype=torch.long),
            "summary": [p[2] if p else c.strip() for p, c in zip(parsed, captions)],
            "tumor": [p[0] if p else None for p in parsed],
            "til": [p[1] if p else None for p in parsed]}


def class_labels_batch(labels: Sequence[int]) -> dict[str, Any]:
    """Batch-like dict of class labels (0-3: levels known, 4: unconditional)."""
    import torch

    pairs = [levels_of_class(int(lab)) if int(lab) != UNCONDITIONAL_CLASS else None
             for lab in labels]
    return {"class_label": torch.tensor([int(lab) for lab in labels], dtype=torch.long),
            "tumor": [p[0] if p else None for p in pairs],
            "til": [p[1] if p else None for p in pairs]}


def conditioning_batch(conds: Sequence[str | int | Mapping[str, Any]]) -> dict[str, Any]:
    """Batch-like dict of conditions: captions (str), class labels (int) or records (dicts
    with the batch's fields, e.g. ``{"caption", "class_label", "summary"}``)."""
    import torch

    conds = list(conds)
    if all(isinstance(c, Mapping) for c in conds):
        batch: dict[str, Any] = {k: [c[k] for c in conds] for k in conds[0]} if conds else {}
        if "class_label" in batch:
            batch["class_label"] = torch.tensor([int(v) for v in batch["class_label"]],
                                                dtype=torch.long)
        return batch
    if all(isinstance(c, (int, np.integer)) for c in conds):
        return class_labels_batch([int(c) for c in conds])
    if all(isinstance(c, str) for c in conds):
        return captions_batch(conds)
    raise TypeError("conditions must be all captions (str), all class labels (int) or all "
                    f"records (dict), got {sorted({type(c).__name__ for c in conds})}")
