#!/usr/bin/env python
"""Generate patches with a trained PathLDM (DDIM + classifier-free guidance).

Prompts come from --prompt (repeatable) and --prompt-file (one per line). With --tumor and
--til, every text (and --summary) is a slide summary and becomes a training-format caption
"<tumor> tumor; <til> til; <summary>". Class-conditional models take --class-label, or derive
the label from --tumor/--til (0 low/low, 1 low/high TIL, 2 high/low, 3 high/high).

Models that read the levels and the summary separately (configs/ablations/levels_vector_text.yaml)
take the same captions; --guidance-levels S_L and --guidance-text S_T then guide each with its
own scale, e = e_uu + S_L (e_lu - e_uu) + S_T (e_lt - e_lu), in place of the joint --guidance.

--all-levels renders the four tumor/TIL combinations for one --summary (class models: the four
classes) as the paper's Figures 3 and 4: one labelled row per combination, the summary on top,
and the same seed in every row of a column, so columns differ only by the levels.

Writes OUTDIR/<index>.png, OUTDIR/grid.png (one row per prompt) and OUTDIR/metadata.json
(checkpoint, weights, prompts, seed, steps, scale, eta and the seed of every image). Each image
has its own seed, so the batch size does not change the result (with --eta 0), and a rerun of
the same command skips images that already exist.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.argtypes import (
    non_negative_float,
    non_negative_int,
    positive_int,
    seed_int,
    unit_float,
)
from ldm.evaluation.cli import (
    add_checkpoint_args,
    configure_logging,
    resolve_device,
    run_main,
)

logger = logging.getLogger("sample")

EXAMPLES = """examples:
  python scripts/sample.py --ckpt logs/RUN --tumor high --til low \\
      --summary "invasive ductal carcinoma, grade 2, ..." --n 16 --outdir samples/hl
  python scripts/sample.py --ckpt model.ckpt --config configs/pathldm.yaml \\
      --prompt-file prompts.txt --n 4 --seed 1 --outdir samples/file
  python scripts/sample.py --ckpt logs/CLASS_RUN --tumor low --til high --n 8 --outdir samples/c1
  python scripts/sample.py --ckpt logs/RUN --all-levels --n 4 --outdir samples/fig4 \\
      --summary "invasive ductal carcinoma, grade 2, ..."          # Figures 3 and 4
"""
# Settings that must match to resume into an existing OUTDIR.
RESUME_KEYS = ("checkpoint", "weights", "conditioning", "conditions", "steps", "scale", "eta",
               "seed", "n", "all_levels", "guidance")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    c = p.add_argument_group("conditioning")
    c.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    c.add_argument("--prompt-file", type=Path, default=None, help="file with one prompt per line")
    c.add_argument("--tumor", choices=("low", "high"), default=None, help="tumor level")
    c.add_argument("--til", choices=("low", "high"), default=None, help="TIL level")
    c.add_argument("--summary", default=None,
                   help="slide summary for the training caption (needs --tumor and --til)")
    c.add_argument("--class-label", type=non_negative_int, action="append", default=[],
                   help="class-conditional models: label 0-3 (repeatable)")
    c.add_argument("--all-levels", action="store_true",
                   help="the four tumor/TIL combinations of one --summary (class models: the "
                        "four classes) as one labelled grid, the same seeds in every column")
    m = p.add_argument_group("model")
    add_checkpoint_args(m)
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    s.add_argument("--eta", type=unit_float, default=0.0,
                   help="DDIM eta in [0, 1] (default: 0, deterministic)")
    s.add_argument("--scale", "--guidance", dest="scale", type=non_negative_float, default=1.75,
                   help="classifier-free guidance scale, all conditionings jointly "
                        "(default: 1.75, the paper's)")
    s.add_argument("--guidance-levels", type=float, default=None, metavar="S_L",
                   help="models with separate levels and text conditionings: guidance scale of "
                        "the tumor/TIL levels (with --guidance-text: e = e_uu + S_L (e_lu - "
                        "e_uu) + S_T (e_lt - e_lu); replaces --guidance)")
    s.add_argument("--guidance-text", type=float, default=None, metavar="S_T",
                   help="guidance scale of the summary text, added after the levels")
    s.add_argument("--n", type=positive_int, default=4, help="images per prompt (default: 4)")
    s.add_argument("--batch-size", type=positive_int, default=4,
                   help="images per batch (default: 4)")
    s.add_argument("--seed", type=seed_int, default=0, help="base seed (default: 0)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    o = p.add_argument_group("output")
    o.add_argument("--outdir", type=Path, default=Path("outputs/samples"),
                   help="output folder (default: outputs/samples)")
    o.add_argument("--overwrite", action="store_true",
                   help="regenerate every image even if OUTDIR holds a different run")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Texts from --summary, --prompt and --prompt-file; training captions when levels are set."""
    from ldm.data.captions import caption_from_levels

    texts = list(args.prompt)
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise FileNotFoundError(f"prompt file not found: {args.prompt_file}")
        texts += [t.strip() for t in args.prompt_file.read_text(encoding="utf-8").splitlines()
                  if t.strip()]
    if (args.tumor is None) != (args.til is None):
        raise ValueError("give --tumor and --til together")
    if args.tumor is None:
        if args.summary is not None:
            raise ValueError("--summary needs --tumor and --til to build a caption")
        return texts
    if args.summary is not None:
        texts.insert(0, args.summary)
    return [caption_from_levels(args.tumor, args.til, t) for t in texts]


def conditions(args: argparse.Namespace, kind: str) -> list[Any]:
    """One condition per prompt: a caption, a class label, or None for unconditional models."""
    from ldm.data.captions import class_label_from_levels
    from ldm.evaluation.sampling import class_of, tumor_til_conditions

    if args.all_levels:
        if args.prompt or args.prompt_file or args.tumor or args.til or args.class_label:
            raise ValueError("--all-levels takes only --summary: it sets the tumor/TIL levels")
        return [cond for _, cond in tumor_til_conditions(kind, args.summary)]
    if kind == "none":
        return [None]
    if kind == "class":
        if args.class_label:
            labels = list(args.class_label)
        elif args.tumor is not None or args.til is not None:
            if args.tumor is None or args.til is None:
                raise ValueError("give --tumor and --til together")
            labels = [class_label_from_levels(args.tumor, args.til)]
        else:
            labels = [class_of(p) for p in read_prompts(args)]
        if not labels:
            raise ValueError("class-conditional model: give --class-label or --tumor/--til")
        return labels
    if args.class_label:
        raise ValueError("--class-label is for class-conditional models; this one takes text")
    prompts = read_prompts(args)
    if not prompts:
        raise ValueError("text-conditional model: give --prompt, --prompt-file or "
                         "--tumor/--til with --summary")
    return prompts


def plan_images(conds: Sequence[Any], n: int, seed: int, kind: str,
                shared_columns: bool = False) -> list[dict[str, Any]]:
    """File name, condition, levels and seed of every image (index = prompt * n + j).

    Image k's seed derives from k, or with ``shared_columns`` from its column j, so every
    prompt's j-th image starts from the same noise.
    """
    from ldm.data.captions import UNCONDITIONAL_CLASS, levels_from_caption, levels_of_class
    from ldm.evaluation.sampling import image_seed

    images = []
    for p, cond in enumerate(conds):
        levels = (levels_of_class(cond) if kind == "class" and cond != UNCONDITIONAL_CLASS
                  else levels_from_caption(cond) if kind == "text" else None)
        for j in range(n):
            k = p * n + j
            rec = {"file": f"{k:05d}.png", "prompt_index": p,
                   "seed": image_seed(seed, j if shared_columns else k)}
            rec["class_label" if kind == "class" else "prompt"] = cond
            if levels:
                rec["tumor"], rec["til"] = levels
            images.append(rec)
    return images


def separate_guidance(args: argparse.Namespace) -> list[tuple[str, float]] | None:
    """``[("levels", S_L), ("text", S_T)]`` from --guidance-levels/--guidance-text, or None."""
    scales = [(name, value) for name, value in (("levels", args.guidance_levels),
                                                ("text", args.guidance_text))
              if value is not None]
    return scales or None


def run_metadata(args: argparse.Namespace, loaded: Any, kind: str, conds: Sequence[Any],
                 images: list[dict[str, Any]]) -> dict[str, Any]:
    """``metadata.json`` of a run: checkpoint, settings, conditions and every image."""
    meta = {"checkpoint": str(loaded.checkpoint_path.resolve()), "global_step": loaded.global_step,
            "weights": loaded.weights, "conditioning": kind, "conditions": list(conds),
            "steps": args.steps, "scale": args.scale, "eta": args.eta, "seed": args.seed,
            "n": args.n, "sampler": "DDIM", "grid": "grid.png", "images": images}
    guidance = separate_guidance(args)
    if guidance:
        meta["guidance"] = [list(g) for g in guidance]
    if args.all_levels:
        meta.update(all_levels=True, summary=args.summary)
    return meta


def _check_resume(meta_path: Path, meta: dict[str, Any], overwrite: bool) -> None:
    if overwrite or not meta_path.is_file():
        return
    old = json.loads(meta_path.read_text())
    diff = [k for k in RESUME_KEYS if old.get(k) != meta.get(k)]
    if diff:
        raise ValueError(f"{meta_path.parent} holds samples of a different run (differs in: "
                         f"{', '.join(diff)}); use another --outdir or --overwrite")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point."""
    import numpy as np
    from PIL import Image

    from ldm.checkpoint import load_model, set_trust
    from ldm.evaluation.grids import labelled_grid
    from ldm.evaluation.images import make_grid, save_png, write_json
    from ldm.evaluation.sampling import (
        check_steps,
        conditioning_kind,
        generate_to_folder,
        tumor_til_conditions,
        warn_long_prompts,
    )
    from ldm.export.folder import is_exported_folder, load_exported

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    set_trust(args.trust_checkpoint)
    device = resolve_device(args.device)
    if is_exported_folder(args.ckpt):  # a folder written by scripts/export.py
        loaded = load_exported(args.ckpt)
    else:
        loaded = load_model(args.ckpt, config=args.config, weights=args.weights)
    model = loaded.model.to(device)
    check_steps(model, args.steps)
    kind = conditioning_kind(model)
    conds = conditions(args, kind)
    if kind == "text":
        warn_long_prompts(model, conds)
    images = plan_images(conds, args.n, args.seed, kind, shared_columns=args.all_levels)
    meta = run_metadata(args, loaded, kind, conds, images)
    guidance = separate_guidance(args)
    args.outdir.mkdir(parents=True, exist_ok=True)
    meta_path = args.outdir / "metadata.json"
    _check_resume(meta_path, meta, args.overwrite)
    if args.overwrite:
        for rec in images:
            (args.outdir / rec["file"]).unlink(missing_ok=True)
    write_json(meta, meta_path)
    items = [{"path": args.outdir / r["file"], "seed": r["seed"],
              "cond": r.get("prompt", r.get("class_label"))} for r in images]
    made = generate_to_folder(model, items, args.batch_size, args.steps, args.scale, args.eta,
                              desc="sampling", guidance=guidance)
    tiles = [np.asarray(Image.open(args.outdir / r["file"]).convert("RGB")) for r in images]
    if args.all_levels:
        grid = labelled_grid([tiles[i:i + args.n] for i in range(0, len(tiles), args.n)],
                             [label for label, _ in tumor_til_conditions(kind, args.summary)],
                             title=args.summary if kind == "text" else None)
    else:
        nrow = args.n if args.n <= 8 else math.ceil(math.sqrt(len(tiles)))
        grid = make_grid(tiles, nrow=nrow)
    save_png(grid, args.outdir / "grid.png")
    print(f"{made} new images, {len(images)} in {args.outdir} (grid.png, metadata.json)")
    return meta


if __name__ == "__main__":
    run_main(main)
