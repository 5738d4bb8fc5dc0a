"""Run the four data-preparation steps on the bundled demo slide and reports.

``data/demo/`` holds one real H&E region (CMU-1-Small-Region, 20x, skin) and three short
fictional reports; ``slide_map.csv`` maps the slide to its report. At 10x the region holds only
about 20 non-overlapping 256-px tiles, so the demo tiles with a 64-px stride (overlapping tiles).
Without a classifier the tumor/TIL probabilities come from the labelled stain stand-in, and
without ``OPENAI_API_KEY`` the summaries from the labelled local extractive stand-in. With a
single slide the test split is empty.

Example::

    python -m data_prep.demo --out demo_data/
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_prep import build_dataset, summarize_reports, tile_wsi, tumor_til
from data_prep.common import add_logging_arg, setup_logging

logger = logging.getLogger(__name__)
DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


def _step(name: str, fn, argv: list[str]) -> None:
    logger.info("demo step %s: %s", name, " ".join(argv))
    code = fn(argv)
    if code != 0:
        raise RuntimeError(f"demo step {name} failed with exit code {code}")


def run_demo(out_dir: str | Path, demo_dir: str | Path = DEMO_DIR, backend: str = "auto",
             magnification: float = 10.0, tile_size: int = 256, stride: int = 64,
             min_tissue: float = 0.25, n_summaries: int = 1, seed: int = 0,
             tumor_classifier: str | None = None, til_classifier: str | None = None,
             log_level: str = "INFO") -> dict[str, Path]:
    """Tile, add probabilities, summarize and build; returns the paths of the outputs."""
    out, demo = Path(out_dir), Path(demo_dir)
    tiles, summaries, dataset = out / "tiles", out / "summaries.jsonl", out / "dataset"
    common = ["--log-level", log_level]
    # the demo's own tiling (256-px overlapping tiles, Otsu filter, quality 80), not the recipe's
    # 448-px DSMIL tiles: the small demo region holds only six of those
    _step("tile_wsi", tile_wsi.main, [
        str(demo), "--out", str(tiles), "--magnification", str(magnification),
        "--tile-size", str(tile_size), "--stride", str(stride), "--min-tissue", str(min_tissue),
        "--tissue-filter", "otsu", "--jpeg-quality", "80", *common])
    probs = ["--stain-standin"]
    if tumor_classifier:
        probs += ["--tumor-classifier", tumor_classifier]
    if til_classifier:
        probs += ["--til-classifier", til_classifier]
    _step("tumor_til", tumor_til.main, ["--tiles", str(tiles), *probs, *common])
    _step("summarize_reports", summarize_reports.main, [
        str(demo / "reports.csv"), "--out", str(summaries), "--backend", backend,
        "--n-summaries", str(n_summaries), *common])
    _step("build_dataset", build_dataset.main, [
        "--tiles", str(tiles), "--summaries", str(summaries), "--out", str(dataset),
        "--mapping", str(demo / "slide_map.csv"), "--seed", str(seed), *common])
    return {"tiles": tiles, "summaries": summaries, "dataset": dataset,
            "train": dataset / "train.h5", "test": dataset / "test.h5",
            "card": dataset / "dataset_card.json"}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--demo-dir", type=Path, default=DEMO_DIR, help="slide + reports folder")
    p.add_argument("--backend", choices=["auto", "local", "openai"], default="auto",
                   help="summarizer (auto: the API when OPENAI_API_KEY is set, else the "
                        "local stand-in)")
    p.add_argument("--magnification", type=float, default=10.0)
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--stride", type=int, default=64, help="tile step in pixels (overlap)")
    p.add_argument("--min-tissue", type=float, default=0.25)
    p.add_argument("--n-summaries", type=int, default=1)
    p.add_argument("--tumor-classifier", default=None, help="see tumor_til --help")
    p.add_argument("--til-classifier", default=None, help="see tumor_til --help")
    add_logging_arg(p)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    try:
        paths = run_demo(args.out, args.demo_dir, args.backend, args.magnification,
                         args.tile_size, args.stride, args.min_tissue, args.n_summaries,
                         tumor_classifier=args.tumor_classifier,
                         til_classifier=args.til_classifier, log_level=args.log_level)
    except RuntimeError as e:
        logger.error("%s", e)
        return 1
    print("demo outputs:\n" + "\n".join(f"  {k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
