"""Tumor/TIL levels, captions and class labels shared by data prep, training and evaluation."""
from __future__ import annotations

import math

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


def class_label(tumor_prob: float, til_prob: float) -> int:
    """Baseline class: 0 low/low, 1 low tumor/high TIL, 2 high/low, 3 high/high."""
    return 2 * prob_to_level(tumor_prob, 2) + prob_to_level(til_prob, 2)


def legacy_class_label(tumor_prob: float, til_prob: float) -> int:
    """The original class-conditional dataset's label: high when ``p > 0.5`` (so 0.5 is low).

    Differs from :func:`class_label` only at exactly 0.5; used by ``legacy_class_label``.
    """
    return 2 * int(float(tumor_prob) > 0.5) + int(float(til_prob) > 0.5)


def class_label_from_levels(tumor: str, til: str) -> int:
    """Class label from level names (``low``/``high``)."""
    levels = {"low": 0, "high": 1}
    try:
        return 2 * levels[tumor.lower()] + levels[til.lower()]
    except KeyError as e:
        raise ValueError(f"levels must be 'low' or 'high', got tumor={tumor!r}, til={til!r}") from e
