#!/usr/bin/env python
"""Evaluate generated patches against real ones in one or more feature spaces, with a report.

From sample sets (folders of scripts/sample.py or scripts/fid.py generate, or the part-*.h5
store of fid.py generate --format store) and a reference split store (or image folder):

  features      per extractor (--extractor: inception, plip, clip, hf:ID|DIR,
                timm:NAME|DIR[,KEY=VALUE...], open_clip:MODEL@PRETRAINED), saved as
                OUT/features/<set>/features_<ext>.npz with the image names and the protocol;
                reused when present (resumable), an error when made under another protocol.
                --features-only computes everything from saved features, without images or
                networks.
  metrics       Fréchet distance, KID, precision/recall, density/coverage (k=--k) of each set
                against the reference, overall and per tumor/TIL stratum.
  memorisation  nearest training patch of every sample (--train, default the reference).
  adherence     text-image similarity with a CLIP-like extractor (PLIP) of samples, real
                patches and shuffled captions; a linear tumor/TIL probe trained on --train.
  report        OUT/results.json (protocol: formats, crop/resize, n, seeds, reference hash,
                extractor weight hashes, package versions), OUT/report.md and OUT/*.png.

Several --samples sets (LABEL=PATH) are reported side by side: e.g. train and held-out prompts.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.argtypes import int_in, non_negative_int, positive_int, seed_int
from ldm.evaluation.cli import configure_logging, resolve_device, run_main
from ldm.evaluation.evaluation import REFERENCE, TRAIN

logger = logging.getLogger("evaluate")

EXAMPLES = """examples:
  # the paper's Table 1 protocol (Inception FID/KID, 10k samples vs 10k training patches)
  python scripts/evaluate.py --samples gen/train --reference data/tcga_brca/train.h5 \\
      --n 10000 --extractor inception --out eval/table1
  # the extended report: pathology feature spaces, train vs held-out prompts, adherence
  python scripts/evaluate.py --samples train=gen/train test=gen/test \\
      --reference data/tcga_brca/test.h5 --train data/tcga_brca/train.h5 \\
      --extractor inception plip \\
      timm:hf-hub:bioptimus/H-optimus-0,init_values=1e-5,dynamic_img_size=False --out eval/full
  # recompute the metrics from the saved features only
  python scripts/evaluate.py --samples train=gen/train test=gen/test --features-only \\
      --extractor inception plip --out eval/full --k 3
"""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", required=True,
                   help="sample sets, PATH or LABEL=PATH (folder, part-*.h5 folder, store)")
    p.add_argument("--reference", type=Path, default=None,
                   help="real patches: split store (.h5) or image folder")
    p.add_argument("--reference-features", nargs="+", type=Path, default=[],
                   help="saved reference feature files (features_<ext>.npz) to use instead of "
                        "computing them; their protocol must match the requested one")
    p.add_argument("--train", type=Path, default=None,
                   help="training split store for memorisation (all of it unless --train-n) "
                        "and the probe (default: the --reference images)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--extractor", nargs="+", default=["inception"], help="feature spaces")
    p.add_argument("--text-extractor", default="auto",
                   help="CLIP-like extractor for text-image similarity (auto: the first of "
                        "--extractor that has a text tower; none: skip)")
    p.add_argument("--features-only", action="store_true",
                   help="only use saved features (no images, no networks)")
    g = p.add_argument_group("protocol")
    g.add_argument("--n", type=positive_int, default=None,
                   help="random subset of this many images per set (default: all)")
    g.add_argument("--train-n", type=positive_int, default=None,
                   help="random subset of the --train set (default: all of it, so memorisation "
                        "searches every training patch)")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of subsets, KID, shuffles")
    g.add_argument("--center-crop", type=positive_int, default=None, help="centre crop first")
    g.add_argument("--resize", type=positive_int, default=None, help="then bicubic resize")
    g = p.add_argument_group("metrics")
    g.add_argument("--k", type=positive_int, default=5, help="nearest neighbours of PRDC")
    g.add_argument("--kid-subsets", type=positive_int, default=100)
    g.add_argument("--kid-subset-size", type=int_in(2), default=1000)
    g.add_argument("--min-stratum", type=positive_int, default=10,
                   help="fewest images per side for a stratum's metrics")
    g.add_argument("--memorisation-percentile", type=float, default=1.0)
    g.add_argument("--sweep", type=Path, default=None,
                   help="sweep_results.json of scripts/fid.py sweep, plotted vs guidance scale")
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    g.add_argument("--batch-size", type=positive_int, default=50)
    g.add_argument("--num-workers", type=non_negative_int, default=0)
    g.add_argument("--inception-weights", type=Path, default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    g.add_argument("--allow-download", action="store_true",
                   help="let extractors download missing weights")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_sets(specs: Sequence[str]) -> dict[str, Path]:
    """``LABEL=PATH`` or ``PATH`` (label: the folder name) to an ordered dict of sets."""
    sets: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name or spec, spec
        if label in sets or label in (REFERENCE, TRAIN):
            raise ValueError(f"--samples: label {label!r} used twice or reserved; use LABEL=PATH")
        sets[label] = Path(path)
    return sets


def set_info(path: Path) -> dict[str, Any]:
    """Prompt split and guidance scale of a generated set (its generation.json / metadata)."""
    for name in ("generation.json", "metadata.json"):
        f = path / name if path.is_dir() else None
        if f is not None and f.is_file():
            meta = json.loads(f.read_text())
            return {"split": meta.get("split"), "scale": meta.get("scale"),
                    "prompt_sampling": meta.get("prompt_sampling")}
    return {}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point."""
    from ldm.evaluation.evaluation import Evaluation

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    samples = parse_sets(args.samples)
    if args.reference is None and not (args.features_only or args.reference_features):
        raise ValueError("give --reference (or --reference-features / --features-only)")
    sources: dict[str, Path | None] = {REFERENCE: args.reference, **samples}
    if args.train is not None:
        sources[TRAIN] = args.train
    device = None if args.features_only else resolve_device(args.device)
    ev = Evaluation(args, sources, list(samples), device)
    results = ev.run({name: set_info(p) for name, p in samples.items()})
    print(Path(results["report"]).read_text())
    return results


if __name__ == "__main__":
    run_main(main)
