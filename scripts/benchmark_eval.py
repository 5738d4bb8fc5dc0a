#!/usr/bin/env python
"""Time and peak memory of the evaluation metrics (ldm.evaluation.metrics) on random features.

Two sets of ``--n`` random ``--dims``-d features (Gaussians of different scale, float64, as
the extractors save them) go through Fréchet distance, KID (100 subsets of 1000) and
precision/recall/density/coverage (k=5) in a fresh subprocess; the report gives wall time per
metric and the child's peak resident set size (features included). ``--out docs/benchmarks.md``
writes the result into that file's "Evaluation metrics" section (replacing an earlier one).

Example:
  python scripts/benchmark_eval.py --n 10000 --dims 2048 --threads 2 --out docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- evaluation-metrics:begin -->", "<!-- evaluation-metrics:end -->"


def measure(n: int, dims: int, k: int, seed: int) -> dict[str, Any]:
    """Run the metrics once in this process; seconds per stage and peak RSS in bytes."""
    import numpy as np

    from ldm.evaluation.metrics import feature_statistics, frechet_distance, pairwise_metrics

    rng = np.random.default_rng(seed)
    real = rng.standard_normal((n, dims))
    fake = 1.05 * rng.standard_normal((n, dims)) + 0.01
    times: dict[str, Any] = {"load_avg_1min": os.getloadavg()[0]}
    t = time.perf_counter()
    fd = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    times["frechet_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res = pairwise_metrics(real, fake, nearest_k=k, kid_subsets=100, kid_subset_size=1000)
    times["kid_prdc_s"] = time.perf_counter() - t
    times["total_s"] = times["frechet_s"] + times["kid_prdc_s"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024  # Linux: KiB
    times["cpu_s"] = usage.ru_utime + usage.ru_stime  # whole process, data generation included
    return {**times, "peak_rss_bytes": peak, "fd": fd, "kid": res["kid"][0],
            "precision": res["precision"], "recall": res["recall"]}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(args: argparse.Namespace, r: dict[str, Any]) -> str:
    """The Markdown section of one measurement."""
    gb = r["peak_rss_bytes"] / 1024 ** 3
    return "\n".join([
        BEGIN, "## Evaluation metrics", "",
        f"`python scripts/benchmark_eval.py --n {args.n} --dims {args.dims} --threads "
        f"{args.threads} --out docs/benchmarks.md` ({date.today().isoformat()}, {cpu_name()}, "
        f"{args.threads} threads, {os.cpu_count()} CPUs visible)", "",
        f"{args.n:,} x {args.n:,} random {args.dims}-d float64 features: Fréchet distance, "
        "KID (100 subsets of 1000) and precision/recall/density/coverage (k=5), exact and "
        "blocked as `scripts/evaluate.py` computes them.", "",
        "| Fréchet (s) | KID + PRDC (s) | total (s) | process CPU time (s) | peak RSS (GB) |",
        "|---|---|---|---|---|",
        f"| {r['frechet_s']:.1f} | {r['kid_prdc_s']:.1f} | {r['total_s']:.1f} | "
        f"{r['cpu_s']:.1f} | {gb:.2f} |", "",
        "Peak RSS is the measuring process's high-water mark, the two feature sets (2 x "
        f"{args.n * args.dims * 8 / 1024 ** 3:.2f} GB) and Python/torch included. The machine's "
        f"1-minute load average at the start was {r['load_avg_1min']:.1f} (times on a shared "
        "machine are inflated by the other processes; the CPU time, the random features' "
        "generation included, is what the work costs).", END, ""])


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of ``path`` (or append it)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point: measure in a child process, print JSON, optionally write Markdown."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="features per set")
    p.add_argument("--dims", type=int, default=2048, help="feature dimension")
    p.add_argument("--k", type=int, default=5, help="nearest neighbours of PRDC")
    p.add_argument("--threads", type=int, default=2, help="BLAS/torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write the section to")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = measure(args.n, args.dims, args.k, args.seed)
        print(json.dumps(result))
        return result
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, __file__, "--worker", "--n", str(args.n), "--dims", str(args.dims),
           "--k", str(args.k), "--threads", str(args.threads), "--seed", str(args.seed)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    if args.out is not None:
        write_section(args.out, render(args, result))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
