#!/usr/bin/env python
"""Encode every patch of a training store once with a model's frozen first stage.

Training on cached latents skips the VQ encoder at every step. Tiles are encoded whole (set the
dataset's ``size`` to the tile size) and, by default, in their four flipped versions so that flip
augmentation stays exact. Then train with the latents, e.g.:

  python scripts/cache_latents.py --config configs/pathldm.yaml \\
      --store data/tcga_brca/train.h5 --out data/tcga_brca/train_latents_vq-f4.h5
  python main.py --base configs/pathldm.yaml -t --gpus 0,1,2 \\
      data.params.train.latents_path=data/tcga_brca/train_latents_vq-f4.h5

The first stage comes from ``model.params.first_stage_config`` of an LDM config (or from an
autoencoder config's ``model``); ``--ckpt`` overrides its checkpoint. An interrupted run resumes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from ldm.argtypes import positive_int

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", required=True, help="model config(s), merged in order")
    p.add_argument("--store", required=True, help="training store (train.h5 / test.h5)")
    p.add_argument("--out", required=True, help="latents store to write (HDF5)")
    p.add_argument("--ckpt", help="first-stage checkpoint (default: the config's ckpt_path)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="tiles per batch (x4 with flips)")
    p.add_argument("--no-flips", action="store_true",
                   help="encode only the unflipped tiles (train with flip: false)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:1")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a full-pickle load of a checkpoint that a weights-only load "
                        "refuses (can run arbitrary code: only for files you trust)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from ldm.checkpoint import load_config, set_trust
    from ldm.data.latents import cache_latents
    from ldm.evaluation.reconstruction import load_first_stage

    set_trust(args.trust_checkpoint)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if not Path(args.store).is_file():
            raise FileNotFoundError(f"store not found: {args.store}")
        model = load_first_stage(load_config(args.config), args.ckpt)
        out = cache_latents(args.store, model, args.out, batch_size=args.batch_size,
                            flips=not args.no_flips, device=device)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"cache_latents: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
