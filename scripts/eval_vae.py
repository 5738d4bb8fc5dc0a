#!/usr/bin/env python
"""Reconstruction quality of first-stage autoencoders (paper Tables 2 and 3).

Every image goes through encode -> decode (VQ models through the quantizer, KL models through
the posterior mode, or a sample with --kl-sample); the input and the reconstruction are
compared as uint8 RGB images: SSIM (scikit-image, channel_axis=2, data_range=255), MSE on the
0-255 pixel scale and PSNR (dB), each averaged over images. SSIM is Wang et al.'s index by
default (11x11 Gaussian window, sigma 1.5, population covariances; --ssim uniform for
scikit-image's default 7x7 window); the JSON records the setting.

Models are given as --config (an autoencoder config, an LDM config whose first_stage_config is
used, or a config embedded in a checkpoint) with an optional --ckpt (a first-stage checkpoint,
a full LDM checkpoint, or '-' for the config's own ckpt_path); repeat both for several rows.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.argtypes import non_negative_int, positive_int, seed_int
from ldm.evaluation.cli import (
    add_trust_arg,
    configure_logging,
    format_table,
    resolve_device,
    run_main,
)
from ldm.evaluation.images import (
    PartitionDataset,
    open_images,
    pil_transform,
    write_json,
)
from ldm.evaluation.reconstruction import DEFAULT_SSIM, SSIM_SETTINGS, ssim_setting

logger = logging.getLogger("eval_vae")
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")

EXAMPLES = """examples:
  # Table 2: three first stages on held-out TCGA-BRCA patches
  python scripts/eval_vae.py --data data/tcga_brca/test.h5 --n 5000 \\
      --config configs/autoencoder/kl_f8_sd_vae.yaml --ckpt - --name "Stable Diffusion" \\
      --config configs/autoencoder/vq_f4_finetune.yaml --ckpt logs/VQ/checkpoints/last.ckpt \\
      --name Ours
  # Table 3: every non-overlapping 256 and 512 crop of the satellite images, CompVis VQ-f4
  python scripts/eval_vae.py --data deepglobe/ --partition 256 512 \\
      --config configs/autoencoder/vq_f4_finetune.yaml --ckpt - --name VQ-f4
"""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="split store (.h5) or image folder")
    p.add_argument("--config", required=True, action="append", type=Path,
                   help="model config YAML, or a checkpoint with an embedded config (repeat "
                        "for several models)")
    p.add_argument("--ckpt", action="append", default=None,
                   help="checkpoint per --config ('-' = the config's ckpt_path)")
    p.add_argument("--name", action="append", default=None, help="row label per --config")
    crops = p.add_mutually_exclusive_group()
    crops.add_argument("--crop", type=positive_int, nargs="+", default=None,
                       help="centre-crop sizes, one table row each (default: whole images)")
    crops.add_argument("--partition", type=positive_int, nargs="+", default=None,
                       metavar="SIZE",
                       help="partition every image into all its full non-overlapping SIZE x "
                            "SIZE crops (Table 3), one table row per SIZE")
    p.add_argument("--ssim", choices=sorted(SSIM_SETTINGS), default=DEFAULT_SSIM,
                   help="SSIM setting: wang = Wang et al. (Gaussian 11x11 window, sigma 1.5, "
                        "population covariances; default), uniform = scikit-image's default "
                        "(7x7 uniform window, sample covariances)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="random subset of this many images")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the subset and of KL sampling")
    p.add_argument("--kl-sample", action="store_true",
                   help="KL models: decode a posterior sample instead of the mode")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", type=Path, default=Path("vae_eval.json"), help="JSON results")
    add_trust_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _models(args: argparse.Namespace) -> list[tuple[str, Path, str | None]]:
    n = len(args.config)
    ckpts = args.ckpt or ["-"] * n
    names = args.name or [c.stem for c in args.config]
    if len(ckpts) != n or len(names) != n:
        raise ValueError(f"{n} --config but {len(ckpts)} --ckpt and {len(names)} --name; give "
                         "one --ckpt ('-' for the config's ckpt_path) and --name per --config")
    models = []
    for name, cfg, ck in zip(names, args.config, ckpts):
        if ck == "-":  # a checkpoint given as --config carries its own weights
            ck = str(cfg) if cfg.suffix in CKPT_SUFFIXES else None
        models.append((name, cfg, ck))
    return models


def _config(path: Path) -> dict[str, Any]:
    """A YAML config, or the config embedded in a checkpoint written by main.py."""
    from ldm.checkpoint import load_config, read_checkpoint

    if path.suffix in CKPT_SUFFIXES:
        embedded = read_checkpoint(path).get("config")
        if not embedded:
            raise KeyError(f"{path} has no embedded config; pass a YAML --config")
        return load_config(embedded)
    return load_config(path)


def _datasets(args: argparse.Namespace) -> list[tuple[str, int | None, Any]]:
    """``(mode, size, dataset)`` per table row: whole images, centre crops or partitions."""
    if args.partition:
        whole = open_images(args.data, n=args.n, seed=args.seed)
        return [("partition", s, PartitionDataset(whole, s)) for s in args.partition]
    return [("centre" if c else "whole", c, open_images(args.data, n=args.n, seed=args.seed,
                                                         transform=pil_transform(center_crop=c),
                                                         one_size=True))
            for c in args.crop or [None]]


def render(rows: Sequence[dict[str, Any]]) -> str:
    """Rows in the layout of Tables 2/3, MSE on the 0-255 scale."""
    table = [[r["name"], r["image_size"], r["f"], r["latent_size"], f"{r['ssim']:.3f}",
              f"{r['mse']:.3f}", f"{r['psnr']:.2f}", r["n"]] for r in rows]
    return format_table(["VAE", "Image resolution", "f", "Latent size", "SSIM ↑",
                         "MSE ↓ (0-255)", "PSNR ↑ (dB)", "n"], table)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Entry point."""
    import torch

    from ldm.checkpoint import set_trust
    from ldm.evaluation.reconstruction import evaluate_reconstructions, load_first_stage

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    set_trust(args.trust_checkpoint)
    device = resolve_device(args.device)
    rows = []
    for name, cfg_path, ckpt in _models(args):
        model = load_first_stage(_config(cfg_path), ckpt).to(device)
        for mode, crop, data in _datasets(args):
            torch.manual_seed(args.seed)
            res = evaluate_reconstructions(model, data, batch_size=args.batch_size,
                                           sample_posterior=args.kl_sample,
                                           num_workers=args.num_workers, desc=name,
                                           ssim=args.ssim)
            rows.append({"name": name, "config": str(cfg_path), "ckpt": ckpt, "crop": crop,
                         "crop_mode": mode, **res})
            logger.info("%s (%s crop %s): SSIM %.4f, MSE %.3f over %d images", name, mode, crop,
                        res["ssim"], res["mse"], res["n"])
        del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json({"data": str(args.data), "mse_scale": "0-255 (uint8 pixels)",
                "ssim": {"setting": args.ssim, **ssim_setting(args.ssim)},
                "kl_posterior": "sample" if args.kl_sample else "mode", "results": rows}, args.out)
    print(render(rows))
    print("\nMSE: mean squared error per pixel and channel on the 0-255 scale; SSIM/MSE/PSNR "
          f"averaged over images (crops); SSIM setting {args.ssim} {ssim_setting(args.ssim)}."
          f"\nresults: {args.out}")
    return rows


if __name__ == "__main__":
    run_main(main)
