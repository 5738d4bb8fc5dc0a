"""Statistics of a training store and the human-readable dataset card."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from ldm.data.captions import (
    LEVEL_NAMES,
    UNCONDITIONAL_CLASS,
    class_label,
    levels_of_class,
    prob_to_level,
)
from ldm.data.store import read_attrs

CLASS_NAMES = {c: "{} tumor + {} til".format(*levels_of_class(c))
               for c in range(UNCONDITIONAL_CLASS)}
CLASS_NAMES[UNCONDITIONAL_CLASS] = "a probability unknown: unconditional"


def _class(tumor: float, til: float) -> int:
    """Class label of a patch; the unconditional class where a probability is unknown."""
    if np.isnan(tumor) or np.isnan(til):
        return UNCONDITIONAL_CLASS
    return class_label(tumor, til)


def split_stats(path: Path) -> dict:
    """Slides, patches, summaries per slide and patches per tumor/TIL class of one store."""
    with h5py.File(path, "r") as f:
        tumor, til = f["tumor_prob"][:], f["til_prob"][:]
        n_sum = f["n_summaries"][:]
        slide_index = f["slide_index"][:]
        attrs = read_attrs(f)
    classes = Counter(_class(a, b) for a, b in zip(tumor.tolist(), til.tolist()))
    per_slide = np.bincount(slide_index, minlength=len(n_sum)) if len(n_sum) else np.zeros(0)
    tumor_levels = _level_counts(tumor)
    til_levels = _level_counts(til)
    return {
        "file": path.name,
        "slides": int(len(n_sum)),
        "patches": int(len(tumor)),
        "summaries": int(n_sum.sum()),
        "summaries_per_slide": {str(k): v for k, v in sorted(Counter(n_sum.tolist()).items())},
        "patches_per_slide": ({"min": int(per_slide.min()), "median": float(np.median(per_slide)),
                               "max": int(per_slide.max())} if len(per_slide) else {}),
        "patches_per_class": {f"{c} ({CLASS_NAMES[c]})": classes[c] for c in range(5)},
        "patches_per_tumor_level": dict(tumor_levels),
        "patches_per_til_level": dict(til_levels),
        "dropped_tiles": {"low_tissue": int(attrs.get("dropped_low_tissue", 0)),
                          "nan_probability": int(attrs.get("dropped_nan_probability", 0))},
        "kept_without_probability": int(attrs.get("kept_nan_probability", 0)),
        "slides_without_patches": json.loads(attrs.get("slides_without_patches", "[]")),
    }


def _level_counts(p: np.ndarray) -> dict[str, int]:
    """Patches per low/high level of one probability, and how many have none."""
    known = p[np.isfinite(p)]
    high = sum(prob_to_level(v, 2) for v in known.tolist())
    return {LEVEL_NAMES[2][0]: len(known) - high, LEVEL_NAMES[2][1]: high,
            "unknown": int(len(p) - len(known))}


def render_card(card: dict) -> str:
    """Markdown dataset card."""
    splits = card["splits"]
    names = list(splits)
    rows = [("slides", "slides"), ("patches", "patches"), ("summaries", "summaries"),
            ("patches without a probability (kept)", "kept_without_probability")]
    lines = ["# Dataset card", "", f"Created {card['created']}; store format "
             f"{card['format_version']}; config `{json.dumps(card['config'])}`.", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(str(splits[n].get(key, 0)) for n in names) + " |"
              for label, key in rows]
    for key in ("patches_per_class", "patches_per_tumor_level", "patches_per_til_level",
                "summaries_per_slide", "patches_per_slide", "dropped_tiles"):
        sub = sorted({k for n in names for k in splits[n][key]})
        lines += [f"| **{key.replace('_', ' ')}** |" + " |" * len(names)]
        lines += [f"| {k} | " + " | ".join(str(splits[n][key].get(k, 0)) for n in names) + " |"
                  for k in sub]
    models = ", ".join(f"{m} ({c})" for m, c in card.get("summary_models", {}).items())
    lines += ["", f"Summary records by model (whole summaries file): {models or 'none'}",
              f"Summaries over the CLIP budget (flagged): {card.get('misfit_summaries', 0)}",
              "Probability sources: " + "; ".join(f"{s} ({c} slides)" for s, c in
                                                  card.get("probability_sources", {}).items()),
              f"Slides without summary: {card.get('slides_without_summary', [])}",
              f"Slides without a split: {card.get('unassigned_slides', [])}"]
    for n in names:
        if splits[n]["slides_without_patches"]:
            lines.append(f"Slides without patches in {n}: {splits[n]['slides_without_patches']}")
    return "\n".join(lines) + "\n"
