"""The evaluation report: Markdown summary and PNG plots from the results JSON of evaluate.py."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldm.evaluation.cli import format_table
from ldm.optional import require

logger = logging.getLogger(__name__)

METRICS = (("fd", "FD", ".3f"), ("kid", "KID x1e3", "kid"), ("precision", "precision", ".3f"),
           ("recall", "recall", ".3f"), ("density", "density", ".3f"),
           ("coverage", "coverage", ".3f"))


def fmt(value: Any, spec: str = ".3f") -> str:
    """A number for a table cell (blank when absent)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if spec == "kid":
        return f"{1e3 * value:.3f}"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def metrics_table(results: dict[str, Any]) -> str:
    """One row per extractor and metric, one column per sample set (side by side)."""
    sets = list(results["sample_sets"])
    rows = []
    for ext, per_set in results["metrics"].items():
        for key, label, spec in METRICS:
            rows.append([ext, label] + [fmt(per_set[s]["overall"].get(key), spec) for s in sets])
    return format_table(["extractor", "metric", *sets], rows)


def strata_table(results: dict[str, Any], extractor: str, key: str = "fd") -> str:
    """``key`` per tumor/TIL stratum (rows) and sample set (columns) for one extractor."""
    sets = list(results["sample_sets"])
    per_set = results["metrics"][extractor]
    strata = sorted({s for name in sets for s in per_set[name]["strata"]})
    rows = []
    for stratum in strata:
        cells = []
        for name in sets:
            st = per_set[name]["strata"].get(stratum, {})
            cells.append(fmt(st.get(key)) if key in st else f"n={st.get('n_fake', 0)}")
        rows.append([stratum, *cells])
    return format_table(["tumor/TIL", *sets], rows)


def _adherence_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    ti = results.get("text_image")
    if ti:
        lines += [f"Text-image similarity ({ti['extractor']}, cosine, captions truncated to the "
                  "text tower's length):", ""]
        rows = [[name, fmt(v.get("own_caption")), fmt(v.get("shuffled_caption")), v.get("n")]
                for name, v in ti["sets"].items()]
        lines += ["```", format_table(["set", "own caption", "shuffled captions", "n"], rows),
                  "```", ""]
    for ext, per_set in results.get("probe", {}).items():
        rows = [[name, t, fmt(r.get("real_held_out_accuracy")), fmt(r.get("samples_accuracy")),
                 fmt(r.get("chance"))] if "skipped" not in r else [name, t, r["skipped"], "", ""]
                for name, per_target in per_set.items() for t, r in per_target.items()]
        lines += [f"Linear probe on {ext} features (trained on real training patches; accuracy "
                  "against the requested levels):", "", "```",
                  format_table(["set", "target", "held-out real (ceiling)", "samples",
                                "chance"], rows), "```", ""]
    return lines


def _memorisation_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for ext, per_set in results.get("memorisation", {}).items():
        rows = [[name, fmt(m["fraction_flagged"], ".4f"), m["n_exact_copies"],
                 fmt(m["ratio_median"]), fmt(m["threshold"], ".4g")]
                for name, m in per_set.items()]
        pct = next(iter(per_set.values()))["percentile"] if per_set else ""
        lines += [f"Memorisation in {ext} features (flagged: closer to a training patch than "
                  f"the {pct}th percentile of train-train nearest-neighbour distances):", "",
                  "```", format_table(["set", "flagged", "exact copies", "median ratio",
                                       "threshold"], rows), "```", ""]
    return lines


def markdown(results: dict[str, Any], plots: Sequence[Path]) -> str:
    """The Markdown summary of a results dict."""
    proto = results["protocol"]
    lines = ["# Evaluation report", "", f"Reference: `{proto['reference']['path']}` "
             f"({proto['reference']['n']} images, sha256 {proto['reference']['sha256'][:12]}); "
             f"centre crop {proto['center_crop']}, resize {proto['resize']}, seed "
             f"{proto['seed']}.", ""]
    for flag in results.get("flags", []):
        lines.append(f"> **Warning:** {flag}")
    lines += ["", "## Fidelity and diversity", "", "```", metrics_table(results), "```", ""]
    for ext in results["metrics"]:
        lines += [f"### Per tumor/TIL stratum: FD in {ext} features", "", "```",
                  strata_table(results, ext), "```", ""]
    lines += ["## Memorisation", "", *_memorisation_lines(results)]
    lines += ["## Prompt adherence", "", *_adherence_lines(results)]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


def _pyplot() -> Any:
    """``matplotlib.pyplot`` (the ``[eval]`` extra) with a file-only backend."""
    matplotlib = require("matplotlib", "eval", "the evaluation report's plots")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "eval", "the evaluation report's plots")


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_precision_recall(results: dict[str, Any], path: Path) -> Path:
    """Precision vs recall of every sample set in every feature space."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 5))
    for ext, per_set in results["metrics"].items():
        for name, m in per_set.items():
            o = m["overall"]
            if "precision" in o:
                ax.scatter(o["recall"], o["precision"], label=f"{name} ({ext})")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"precision / recall (k={results['settings']['nearest_k']})")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_strata(results: dict[str, Any], path: Path, key: str = "fd") -> Path:
    """Per-stratum ``key`` as a heat map (rows: extractor x set, columns: tumor/TIL)."""
    plt = _pyplot()

    rows, labels, strata = [], [], sorted({s for per_set in results["metrics"].values()
                                           for m in per_set.values() for s in m["strata"]})
    for ext, per_set in results["metrics"].items():
        for name, m in per_set.items():
            rows.append([m["strata"].get(s, {}).get(key, np.nan) for s in strata])
            labels.append(f"{name} ({ext})")
    data = np.array(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * len(strata) + 2, 0.5 * len(rows) + 1.5))
    ax.imshow(np.where(np.isnan(data), 0, data), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(strata)), strata, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.3g}", ha="center", va="center", color="w")
    ax.set_title(f"{key.upper()} per tumor/TIL stratum")
    return _save(fig, path)


def plot_guidance(points: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Metric vs guidance scale, one line per (metric, prompt split); None without points."""
    plt = _pyplot()

    lines: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        lines.setdefault(p["label"], []).append((p["scale"], p["value"]))
    if not any(len(v) > 1 for v in lines.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=label)
    ax.set(xlabel="guidance scale", ylabel="distance (lower is better)",
           title="metric vs guidance scale")
    ax.legend(fontsize=7)
    return _save(fig, path)


def guidance_points(results: dict[str, Any], sweep: dict[str, Any] | None) -> list[dict]:
    """(label, scale, value) points: fid.py sweep FIDs and this run's FD per scaled set."""
    points = []
    for row in (sweep or {}).get("results", []):
        if row.get("scale") is not None and row.get("fid") is not None:
            points.append({"label": f"FID ({row.get('split')} prompts, fid.py sweep)",
                           "scale": float(row["scale"]), "value": float(row["fid"])})
    for ext, per_set in results["metrics"].items():
        for name, m in per_set.items():
            info = results["sample_sets"][name]
            if info.get("scale") is not None and "fd" in m["overall"]:
                points.append({"label": f"FD {ext} ({info.get('split') or 'samples'})",
                               "scale": float(info["scale"]), "value": m["overall"]["fd"]})
    return points


def nn_pairs_image(pairs: Sequence[tuple[Any, Any]], path: Path, size: int = 128) -> Path:
    """A PNG with one row per (sample, nearest training patch) pair of PIL images."""
    from ldm.evaluation.images import make_grid, save_png

    tiles = []
    for sample, train in pairs:
        tiles += [np.asarray(im.convert("RGB").resize((size, size))) for im in (sample, train)]
    save_png(make_grid(tiles, nrow=2), path)
    return path
