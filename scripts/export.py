#!/usr/bin/env python
"""Export a trained PathLDM as a diffusers folder with a model card, ready to push to the hub.

From a run directory (or a checkpoint and its config) to OUTDIR holding the U-Net
(UNet2DConditionModel), the first stage (VQModel or AutoencoderKL), a DDIMScheduler, the text
tower and tokenizer (or the class embedder), a custom pipeline with PathLDM's 154-token
encoding and classifier-free guidance, safetensors weights and README.md (the model card).
EMA weights by default (--no-ema for the raw ones). Needs `pip install -e ".[export]"`.

The card lists the evaluation results (scripts/fid.py, scripts/evaluate.py) found under the
run directory (or given with --eval), the dataset card next to the training store (or
--dataset-card) and the resolved config. Loading the folder takes three lines (see its
README.md); `scripts/sample.py --ckpt OUTDIR` samples it with this project's CLI.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.argtypes import non_negative_float
from ldm.evaluation.cli import configure_logging, run_main

logger = logging.getLogger("export")

EXAMPLES = """examples:
  python scripts/export.py --ckpt logs/RUN --out exported/pathldm
  python scripts/export.py --ckpt model.ckpt --config configs/pathldm.yaml --no-ema \\
      --eval fid_results.json --license cc-by-nc-4.0 --repo-id me/pathldm --out exported/x
  huggingface-cli upload me/pathldm exported/pathldm      # publish (needs a login)
"""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path,
                   help="run directory (logs/RUN) or checkpoint file")
    p.add_argument("--config", type=Path, action="append", default=None,
                   help="config YAML for checkpoints without an embedded one (repeatable)")
    p.add_argument("--no-ema", action="store_true",
                   help="export the raw weights (default: the EMA weights when present)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--license", default="other",
                   help="licence id for the card's metadata (default: other)")
    p.add_argument("--repo-id", default=None,
                   help="hub repository id; the card's snippet loads it instead of the folder")
    p.add_argument("--guidance-scale", type=non_negative_float, default=1.75,
                   help="the pipeline's default guidance scale (default: 1.75, the paper's)")
    p.add_argument("--dataset-card", type=Path, default=None,
                   help="dataset_card.md to embed (default: next to the config's train store)")
    p.add_argument("--eval", type=Path, action="append", default=[],
                   help="results JSON of scripts/fid.py or scripts/evaluate.py (repeatable; "
                        "default: every one found under the run directory)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full-pickle checkpoint loading (only for files you trust)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _eval_results(args: argparse.Namespace, ckpt_path: Path) -> list[dict[str, Any]]:
    from ldm.export.card import find_eval_results, read_eval_results

    if args.eval:
        results = []
        for path in args.eval:
            if not path.is_file():
                raise FileNotFoundError(f"evaluation results not found: {path}")
            res = read_eval_results(path)
            if res is None:
                raise ValueError(f"{path} is neither scripts/fid.py's results JSON (rows with "
                                 "'fid') nor scripts/evaluate.py's results.json")
            results.append(res)
        return results
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return find_eval_results(run)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point."""
    from ldm.checkpoint import load_model, set_trust
    from ldm.export.card import find_dataset_card
    from ldm.export.exporter import ExportOptions, export_model

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    set_trust(args.trust_checkpoint)
    if args.dataset_card is not None and not args.dataset_card.is_file():
        raise FileNotFoundError(f"dataset card not found: {args.dataset_card}")
    loaded = load_model(args.ckpt, config=args.config, weights="raw" if args.no_ema else "auto")
    if not args.no_ema and loaded.weights != "ema":
        logger.warning("%s has no EMA weights: exporting the raw ones", loaded.checkpoint_path)
    opts = ExportOptions(license=args.license, repo_id=args.repo_id,
                         guidance_scale=args.guidance_scale,
                         dataset_card=args.dataset_card or find_dataset_card(loaded.config),
                         eval_results=_eval_results(args, loaded.checkpoint_path),
                         overwrite=args.overwrite)
    result = export_model(loaded, args.out, opts)
    print(f"exported {loaded.checkpoint_path} ({result['weights']} weights) to {args.out}; "
          f"denoiser self-check {result['self_check_max_rel_err']:.1e} (relative)")
    return result


if __name__ == "__main__":
    run_main(main)
