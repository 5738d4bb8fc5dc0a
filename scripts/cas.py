#!/usr/bin/env python
"""Classification Accuracy Score (paper §4.8, Table 5).

A ResNet-34 (ImageNet weights when available locally) learns the tumor level (low/high) of
patches and is evaluated on real held-out patches (--real-test; labels from tumor_prob with
threshold 0.5). Training data per mode:
  real            real training patches (--real-train)
  synthetic       generated patches (--synthetic), labelled with the tumor level they were
                  generated with: a PNG folder (samples.jsonl of fid.py generate, metadata.json
                  of sample.py) or a generated store (fid.py generate --format store: HDF5
                  parts streamed from disk, for the paper's 3 million patches)
  real+synthetic  both
Defaults follow the paper: 40 epochs, batch 256, Adam lr 1e-3, x0.1 at epochs 20 and 30.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.argtypes import (
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from ldm.evaluation.cli import configure_logging, format_table, resolve_device, run_main
from ldm.evaluation.images import SplitStore, pil_transform, write_json

logger = logging.getLogger("cas")

MODES = ("real", "synthetic", "real+synthetic")
DATA_TYPE = {"real": "Real", "synthetic": "Only Synthetic", "real+synthetic": "Real + Synthetic"}
EXAMPLES = """examples (Table 5):
  # small: 10k PNGs (the FID samples)
  python scripts/fid.py generate --ckpt logs/RUN --store data/tcga_brca/train.h5 --n 10000 \\
      --outdir gen/train
  python scripts/cas.py --real-train data/tcga_brca/train.h5 --real-test data/tcga_brca/test.h5 \\
      --synthetic gen/train --synthetic-name PathLDM --out cas_small.json
  # the paper's scale: 3 million patches, one generation shard per GPU, HDF5 parts
  for i in 0 1 2; do CUDA_VISIBLE_DEVICES=$i python scripts/fid.py generate --ckpt logs/RUN \\
      --store data/tcga_brca/train.h5 --n 3000000 --format store --shard $i/3 \\
      --batch-size 64 --outdir cas/pathldm & done; wait
  python scripts/cas.py --real-train data/tcga_brca/train.h5 --real-test data/tcga_brca/test.h5 \\
      --synthetic cas/pathldm --synthetic-name PathLDM --num-workers 8 --out cas.json
"""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--real-test", required=True, type=Path, help="held-out split store (eval)")
    d.add_argument("--real-train", type=Path, default=None, help="training split store")
    d.add_argument("--synthetic", type=Path, action="append", default=None,
                   help="folder of generated patches (repeatable)")
    d.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="training sets to compare (default: all the given data allows)")
    d.add_argument("--real-name", default="TCGA-BRCA", help="'Data source' of real rows")
    d.add_argument("--synthetic-name", default=None,
                   help="'Data source' of synthetic rows (default: folder name)")
    d.add_argument("--max-real-train", type=positive_int, default=None,
                   help="subsample real training")
    d.add_argument("--max-real-test", type=positive_int, default=None,
                   help="subsample the test set")
    d.add_argument("--image-size", type=positive_int, default=None,
                   help="resize patches to this size (default: as stored)")
    t = p.add_argument_group("training (paper defaults)")
    t.add_argument("--epochs", type=positive_int, default=40)
    t.add_argument("--batch-size", type=positive_int, default=256)
    t.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    t.add_argument("--milestones", type=positive_int, nargs="*", default=[20, 30],
                   help="epochs where the LR is multiplied by --gamma")
    t.add_argument("--gamma", type=positive_float, default=0.1)
    t.add_argument("--flip", action="store_true", help="random flips (not in the paper)")
    t.add_argument("--pretrained", type=Path, default=None,
                   help="ImageNet ResNet-34 state_dict (default: torchvision's cache file "
                        "resnet34-b627a593.pth if present, else random init with a warning)")
    t.add_argument("--no-pretrained", action="store_true", help="random init on purpose")
    o = p.add_argument_group("other")
    o.add_argument("--seed", type=seed_int, default=0)
    o.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    o.add_argument("--out", type=Path, default=Path("cas_results.json"), help="JSON results")
    o.add_argument("--save-models", type=Path, default=None,
                   help="folder to save each trained classifier's state_dict")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _modes(args: argparse.Namespace) -> list[str]:
    available = [m for m in MODES if ("real" not in m or args.real_train)
                 and ("synthetic" not in m or args.synthetic)]
    modes = args.modes or available
    missing = [m for m in modes if m not in available]
    if missing or not modes:
        raise ValueError(f"modes {missing or modes} need --real-train and/or --synthetic "
                         f"(available with the given data: {available})")
    return modes


def run_mode(mode: str, args: argparse.Namespace, test_set: Any, weights: Path | None,
             device: Any) -> dict[str, Any]:
    """Train one classifier on the mode's data and evaluate it on the real test set."""
    from ldm.evaluation.cas import (
        evaluate_classifier,
        labelled_dataset,
        real_labels,
        resnet34,
        synthetic_datasets,
        train_classifier,
    )

    transform = pil_transform(resize=args.image_size)
    real = rows = y = None
    if "real" in mode:
        real = SplitStore(args.real_train)
        rows, y = real_labels(real, max_n=args.max_real_train, seed=args.seed)
    synthetic = ([d for f in args.synthetic for d in synthetic_datasets(f, transform)]
                 if "synthetic" in mode else [])
    train_set = labelled_dataset(real, rows, y, [], transform, extra=synthetic)
    logger.info("%s: %d training patches", mode, len(train_set))
    import torch

    torch.manual_seed(args.seed)  # same head init (and same model) for every mode
    model = resnet34(2, weights).to(device)
    losses = train_classifier(model, train_set, epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, milestones=args.milestones, gamma=args.gamma,
                              seed=args.seed, num_workers=args.num_workers, flip=args.flip)
    result = evaluate_classifier(model, test_set, batch_size=args.batch_size,
                                 num_workers=args.num_workers)
    if args.save_models:
        args.save_models.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save_models / f"resnet34_{mode}.pt")
    sources = ([args.real_name] if real is not None else []) + (
        [args.synthetic_name or ", ".join(f.name for f in args.synthetic)] if synthetic else [])
    return {"mode": mode, "data_type": DATA_TYPE[mode], "data_source": " + ".join(sources),
            "n_train": len(train_set), "train_loss": losses, **result}


def render(rows: Sequence[dict[str, Any]]) -> str:
    """Rows in the layout of Table 5 (plus balanced accuracy and sizes)."""
    return format_table(
        ["Data type", "Data source", "Accuracy (%)", "Balanced acc. (%)", "n train", "n test"],
        [[r["data_type"], r["data_source"], f"{r['accuracy']:.2f}",
          "" if r["balanced_accuracy"] is None else f"{r['balanced_accuracy']:.2f}",
          r["n_train"], r["n"]] for r in rows])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Entry point."""
    from ldm.evaluation.cas import imagenet_weights_path, real_labels
    from ldm.evaluation.images import ImageDataset

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    modes = _modes(args)
    device = resolve_device(args.device)
    weights = None if args.no_pretrained else imagenet_weights_path(args.pretrained)
    test_store = SplitStore(args.real_test)
    test_rows, test_y = real_labels(test_store, max_n=args.max_real_test, seed=args.seed)
    test_set = ImageDataset(test_store, indices=test_rows, labels=test_y,
                            transform=pil_transform(resize=args.image_size))
    logger.info("test: %d real patches (%d high tumor)", len(test_set), int(test_y.sum()))
    rows = [run_mode(mode, args, test_set, weights, device) for mode in modes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json({"real_test": str(args.real_test), "pretrained": str(weights) if weights else None,
                "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "milestones": args.milestones, "gamma": args.gamma, "seed": args.seed,
                "results": rows}, args.out)
    print(render(rows))
    print(f"\nresults: {args.out}")
    return rows


if __name__ == "__main__":
    run_main(main)
