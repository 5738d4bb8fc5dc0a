"""Statistics of a training store and the human-readable dataset card."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from ldm.data.captions import LEVEL_NAMES, class_label

CLASS_NAMES = {2 * t + i: f"{LEVEL_NAMES[2][t]} tumor + {LEVEL_NAMES[2][i]} til"
               for t in range(2) for i in range(2)}


def split_stats(path: Path) -> dict:
    """Slides, patches, summaries per slide and patches per tumor/TIL class of one store."""
    with h5py.File(path, "r") as f:
        tumor, til = f["tumor_prob"][:], f["til_prob"][:]
        n_sum = f["n_summaries"][:]
        slide_index = f["slide_index"][:]
        attrs = dict(f.attrs)
    classes = Counter(class_label(a, b) for a, b in zip(tumor.tolist(), til.tolist()))
    per_slide = np.bincount(slide_index, minlength=len(n_sum)) if len(n_sum) else np.zeros(0)
    tumor_levels = Counter({LEVEL_NAMES[2][t]: sum(classes[2 * t + i] for i in range(2))
                            for t in range(2)})
    til_levels = Counter({LEVEL_NAMES[2][i]: sum(classes[2 * t + i] for t in range(2))
                          for i in range(2)})
    return {
        "file": path.name,
        "slides": int(len(n_sum)),
        "patches": int(len(tumor)),
        "summaries": int(n_sum.sum()),
        "summaries_per_slide": {str(k): v for k, v in sorted(Counter(n_sum.tolist()).items())},
        "patches_per_slide": ({"min": int(per_slide.min()), "median": float(np.median(per_slide)),
                               "max": int(per_slide.max())} if len(per_slide) else {}),
        "patches_per_class": {f"{c} ({CLASS_NAMES[c]})": classes[c] for c in range(4)},
        "patches_per_tumor_level": dict(tumor_levels),
        "patches_per_til_level": dict(til_levels),
        "dropped_tiles": {"low_tissue": int(attrs.get("dropped_low_tissue", 0)),
                          "nan_probability": int(attrs.get("dropped_nan_probability", 0))},
        "slides_without_patches": json.loads(attrs.get("slides_without_patches", "[]")),
    }


def render_card(card: dict) -> str:
    """Markdown dataset card."""
    splits = card["splits"]
    names = list(splits)
    rows = [("slides", "slides"), ("patches", "patches"), ("summaries", "summaries")]
    lines = ["# Dataset card", "", f"Created {card['created']}; store format "
             f"{card['format_version']}; config `{json.dumps(card['config'])}`.", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(str(splits[n][key]) for n in names) + " |"
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
