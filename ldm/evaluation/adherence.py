"""Caption adherence: do the tumor/TIL levels of captions move what a model generates?

Measured with the stand-in statistics of :mod:`ldm.data.stain` (the statistics the demo's
stand-in labels rank): the tumor level should move the mean hematoxylin optical density, the TIL
level the hematoxylin contrast. The real gap (high minus low level) comes from the training
store's patches, the generated gap from a ``scripts/sample.py`` folder whose captions carry
the levels; their ratio says how much of the real difference the captions reproduce.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldm.data.captions import level_name, prob_to_level
from ldm.data.stain import hematoxylin_stats

logger = logging.getLogger(__name__)

LEVELS = ("low", "high")
# target -> (statistic, column of hematoxylin_stats)
TARGETS = {"tumor": ("hematoxylin_od_mean", 0), "til": ("hematoxylin_od_contrast", 1)}


def center_crop(image: np.ndarray, size: int | None) -> np.ndarray:
    """The centred ``size`` x ``size`` crop (the image itself when it is not larger)."""
    h, w = image.shape[:2]
    if size is None or (h <= size and w <= size):
        return image
    y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return image[y: y + size, x: x + size]


def level_means(stats: np.ndarray, levels: dict[str, Sequence[str]]) -> dict[str, dict]:
    """Mean statistic per level of each target: ``{target: {"low": m, "high": m, "n": {...}}}``.

    ``stats`` is ``(N, 2)`` (``hematoxylin_stats`` of N images); ``levels[target]`` the N level
    names.
    """
    out = {}
    for target, (name, col) in TARGETS.items():
        lv = np.asarray(levels[target])
        means, counts = {}, {}
        for level in LEVELS:
            sel = lv == level
            counts[level] = int(sel.sum())
            means[level] = float(stats[sel, col].mean()) if sel.any() else float("nan")
        out[target] = {"statistic": name, **means, "n": counts}
    return out


def store_level_stats(store: str | Path, crop: int | None = None) -> dict[str, dict]:
    """Per-level statistics of a training store's patches (centre crops of ``crop`` pixels)."""
    from ldm.evaluation.images import SplitStore

    images = SplitStore(store)
    probs = {"tumor": images.array("tumor_prob"), "til": images.array("til_prob")}
    known = ~(np.isnan(probs["tumor"]) | np.isnan(probs["til"]))
    stats = np.array([hematoxylin_stats(center_crop(np.asarray(images.image(i)), crop))
                      for i in np.flatnonzero(known)]).reshape(-1, 2)
    images.close()
    levels = {t: [level_name(prob_to_level(p)) for p in probs[t][known]] for t in TARGETS}
    return level_means(stats, levels)


def read_sample_folder(folder: str | Path) -> list[dict[str, Any]]:
    """The images of a ``scripts/sample.py`` folder that carry levels, with their pixels."""
    from PIL import Image

    folder = Path(folder)
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no metadata.json (not a scripts/sample.py "
                                "output folder)")
    records = [r for r in json.loads(meta_path.read_text())["images"] if "tumor" in r]
    if not records:
        raise ValueError(f"{meta_path}: no image has tumor/TIL levels (captions must start "
                         "with '<level> tumor; <level> til;')")
    for r in records:
        with Image.open(folder / r["file"]) as im:
            r["pixels"] = np.asarray(im.convert("RGB"))
    return records


def image_stats(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """``(N, 2)`` :func:`hematoxylin_stats` of the records' pixels (computed once per image)."""
    return np.array([hematoxylin_stats(r["pixels"]) for r in records]).reshape(-1, 2)


def sample_level_stats(records: Sequence[dict[str, Any]], stats: np.ndarray) -> dict[str, dict]:
    """Per-level statistics of generated images (records of :func:`read_sample_folder` and
    their :func:`image_stats`)."""
    return level_means(stats, {t: [r[t] for r in records] for t in TARGETS})


def paired_gaps(records: Sequence[dict[str, Any]], stats: np.ndarray) -> dict[str, dict]:
    """Per target, high minus low level for images that differ only in that level.

    ``sample.py --all-levels`` gives every combination the same seeds, so an image and its
    partner (same seed and other level, other target's level equal) differ only by the caption.
    The mean of these differences, its standard error and the share with the right sign say
    whether a gap is the captions' doing or sampling noise (given from two pairs on).
    """
    by_key = {(r["seed"], r["tumor"], r["til"]): row for r, row in zip(records, stats)
              if "seed" in r}
    out = {}
    for target, (_, col) in TARGETS.items():
        diffs = []
        for (seed, tumor, til), high in by_key.items():
            if (tumor if target == "tumor" else til) != "high":
                continue
            low = by_key.get((seed, "low", til) if target == "tumor" else (seed, tumor, "low"))
            if low is not None:
                diffs.append(high[col] - low[col])
        d = np.asarray(diffs, dtype=np.float64)
        out[target] = {"n": len(d)}
        if len(d) > 1:
            out[target].update(mean=float(d.mean()), sem=float(d.std(ddof=1) / np.sqrt(len(d))),
                               positive_share=float((d > 0).mean()))
    return out


def compare(real: dict[str, dict], generated: dict[str, dict],
            min_ratio: float = 0.5) -> dict[str, Any]:
    """Gaps (high minus low), their ratio, and pass/fail of the adherence criteria.

    Tumor passes when the generated gap is at least ``min_ratio`` of the real one; TIL when its
    generated gap has the sign of the real one (moves its statistic the right way).
    """
    report: dict[str, Any] = {"min_ratio": min_ratio}
    for target in TARGETS:
        r, g = real[target], generated[target]
        real_gap, gen_gap = r["high"] - r["low"], g["high"] - g["low"]
        ratio = gen_gap / real_gap if real_gap else float("nan")
        report[target] = {"statistic": r["statistic"], "real": r, "generated": g,
                          "real_gap": real_gap, "generated_gap": gen_gap, "ratio": ratio,
                          "right_direction": bool(np.sign(gen_gap) == np.sign(real_gap) != 0)}
    report["tumor"]["passed"] = bool(report["tumor"]["ratio"] >= min_ratio)
    report["til"]["passed"] = report["til"]["right_direction"]
    report["passed"] = report["tumor"]["passed"] and report["til"]["passed"]
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines of a :func:`compare` report."""
    lines = ["caption adherence (high minus low level; stand-in statistics of ldm.data.stain)"]
    for target in TARGETS:
        t = report[target]
        lines.append(f"  {target:<5} {t['statistic']}: real low {t['real']['low']:.4f} high "
                     f"{t['real']['high']:.4f} gap {t['real_gap']:+.4f} | generated low "
                     f"{t['generated']['low']:.4f} high {t['generated']['high']:.4f} gap "
                     f"{t['generated_gap']:+.4f} | ratio {t['ratio']:.2f} "
                     f"({'pass' if t['passed'] else 'FAIL'})")
        p = t.get("paired")
        if p and "mean" in p:
            lines.append(f"        same-seed pairs: {p['n']}, gap {p['mean']:+.4f} +- "
                         f"{p['sem']:.4f} (s.e.), higher in {p['positive_share']:.0%}")
    lines.append(f"  criteria: tumor ratio >= {report['min_ratio']}, TIL in the right "
                 f"direction -> {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def check_adherence(store: str | Path, samples: str | Path, out_json: str | Path | None = None,
                    min_ratio: float = 0.5) -> dict[str, Any]:
    """Compare a sample folder with the store it was trained on; optionally write the JSON."""
    from ldm.evaluation.images import write_json

    records = read_sample_folder(samples)
    size = records[0]["pixels"].shape[0]
    stats = image_stats(records)
    report = compare(store_level_stats(store, crop=size), sample_level_stats(records, stats),
                     min_ratio)
    for target, paired in paired_gaps(records, stats).items():
        report[target]["paired"] = paired
    report.update(store=str(store), samples=str(samples), image_size=size,
                  n_generated=len(records))
    if out_json is not None:
        write_json(report, out_json)
    return report

