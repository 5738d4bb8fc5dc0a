"""Reader-study statistics: accuracy, sensitivity, specificity (Wilson CIs) and kappas.

"Positive" is *synthetic*: sensitivity is the share of synthetic images called synthetic,
specificity the share of real images called real.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile
LABELS = ("real", "synthetic")


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion; None when ``n == 0``."""
    if n == 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict[str, Any]:
    """``{"value", "successes", "n", "ci95"}`` of a proportion (value None when ``n == 0``)."""
    ci = wilson_interval(successes, n)
    return {"value": successes / n if n else None, "successes": successes, "n": n,
            "ci95": list(ci) if ci else None}


def binary_metrics(truth: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
    """Accuracy, sensitivity (synthetic found) and specificity (real kept) with Wilson CIs."""
    if len(truth) != len(answers):
        raise ValueError(f"{len(truth)} truths for {len(answers)} answers")
    bad = sorted({v for v in (*truth, *answers) if v not in LABELS})
    if bad:
        raise ValueError(f"labels must be {LABELS}, got {bad}")
    pairs = list(zip(truth, answers))
    tp = sum(t == a == "synthetic" for t, a in pairs)
    tn = sum(t == a == "real" for t, a in pairs)
    n_pos = sum(t == "synthetic" for t in truth)
    n_neg = len(truth) - n_pos
    return {"n": len(pairs), "accuracy": proportion(tp + tn, len(pairs)),
            "sensitivity": proportion(tp, n_pos), "specificity": proportion(tn, n_neg),
            "confusion": {"true_synthetic": tp, "false_real": n_pos - tp,
                          "true_real": tn, "false_synthetic": n_neg - tn}}


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters over the same items; None when chance agreement is 1."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty ratings ({len(a)} and {len(b)})")
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    return None if pe == 1 else (po - pe) / (1 - pe)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa from an items x categories table of rating counts (same raters per item)."""
    if not counts:
        raise ValueError("no items")
    raters = {sum(row) for row in counts}
    if len(raters) != 1 or raters.pop() < 2:
        raise ValueError("every item needs the same number (>= 2) of ratings")
    n_items, m = len(counts), sum(counts[0])
    p_items = [(sum(c * c for c in row) - m) / (m * (m - 1)) for row in counts]
    p_bar = sum(p_items) / n_items
    totals = [sum(row[j] for row in counts) for j in range(len(counts[0]))]
    pe = sum((t / (n_items * m)) ** 2 for t in totals)
    return None if pe == 1 else (p_bar - pe) / (1 - pe)


def agreement(answers: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Kappa between readers over the items every one of them answered.

    ``answers`` maps reader -> item -> answer. Two readers: Cohen's kappa; three or more:
    Fleiss' kappa and the pairwise Cohen's kappas.
    """
    readers = sorted(r for r, a in answers.items() if a)
    out: dict[str, Any] = {"readers": readers, "items": 0}
    if len(readers) < 2:
        return out
    common = sorted(set.intersection(*(set(answers[r]) for r in readers)))
    out["items"] = len(common)
    if not common:
        return out
    pairwise = {f"{x} / {y}": cohen_kappa([answers[x][i] for i in common],
                                          [answers[y][i] for i in common])
                for x, y in combinations(readers, 2)}
    if len(readers) == 2:
        out["cohen_kappa"] = next(iter(pairwise.values()))
    else:
        table = [[sum(answers[r][i] == lab for r in readers) for lab in LABELS] for i in common]
        out["fleiss_kappa"] = fleiss_kappa(table)
        out["pairwise_cohen_kappa"] = pairwise
    return out


def study_statistics(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-reader, pooled and per-stratum metrics plus agreement from answer rows.

    Each row has ``reader``, ``item``, ``truth``, ``answer``, ``confidence`` and ``stratum``.
    """
    rows = list(rows)
    by_reader: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_stratum: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_reader[r["reader"]].append(r)
        by_stratum[r.get("stratum") or "all"].append(r)

    def metrics(group: list[dict[str, Any]]) -> dict[str, Any]:
        m = binary_metrics([r["truth"] for r in group], [r["answer"] for r in group])
        conf = [r["confidence"] for r in group if r.get("confidence") is not None]
        m["mean_confidence"] = sum(conf) / len(conf) if conf else None
        return m

    return {"answers": len(rows),
            "readers": {name: metrics(g) for name, g in sorted(by_reader.items())},
            "pooled": metrics(rows) if rows else None,
            "strata": {s: metrics(g) for s, g in sorted(by_stratum.items())},
            "agreement": agreement({name: {r["item"]: r["answer"] for r in g}
                                    for name, g in by_reader.items()})}
