#!/usr/bin/env python
"""Generate one image larger than the model's patches by joint sampling over a latent canvas.

MultiDiffusion (Bar-Tal et al. 2023), training-free: at every DDIM step the canvas latent is
covered by overlapping windows of the model's patch size, the U-Net runs on the windows in
batches (with classifier-free guidance), the noise predictions are averaged where windows
overlap (uniform or Gaussian window weights) and one DDIM update moves the whole canvas. The
latent is then decoded in overlapping tiles.

Conditioning: one caption for the whole image (--prompt, or --tumor/--til with --summary), or
a tumor/TIL layout (--layout JSON/CSV/PNG, or --layout-from STORE --slide ID --region x y w h
from a real slide's tiles) with one --summary for the slide; every window takes the caption of
the region under its centre, or with --layout-mode blend a blend of the regions' embeddings.
Class-conditional models take --class-label or a layout of classes.

Writes OUTDIR/image.png (up to --png-max-pixels), else or with --tiff OUTDIR/image.tiff, a
tiled pyramidal BigTIFF with the model's microns per pixel that OpenSlide and QuPath open as a
slide, and OUTDIR/metadata.json (every setting, the layout, the seam score). A canvas of exactly
one window gives sample.py's first image for the same --seed.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.argtypes import (
    non_negative_float,
    non_negative_int,
    positive_float,
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

logger = logging.getLogger("sample_large")

EXAMPLES = """examples:
  python scripts/sample_large.py --ckpt logs/RUN --size 1024 1024 --tumor high --til low \\
      --summary "invasive ductal carcinoma, grade 2, ..." --outdir large/hl
  python scripts/sample_large.py --ckpt logs/RUN --size 2048 1024 --layout layout.json \\
      --overlap 0.5 --weighting gaussian --outdir large/layout
  python scripts/sample_large.py --ckpt logs/RUN --size 1024 1024 --layout-from data/test.h5 \\
      --slide TCGA-XX-0000 --region 20000 12000 8192 8192 --tiff --outdir large/twin
"""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    c = p.add_argument_group("conditioning")
    c.add_argument("--prompt", default=None, help="one caption for the whole image")
    c.add_argument("--tumor", choices=("low", "high"), default=None, help="tumor level")
    c.add_argument("--til", choices=("low", "high"), default=None, help="TIL level")
    c.add_argument("--summary", default=None, help="slide summary (with levels or a layout)")
    c.add_argument("--class-label", type=non_negative_int, default=None,
                   help="class-conditional models: label 0-3 for the whole image")
    c.add_argument("--layout", type=Path, default=None,
                   help="tumor/TIL layout grid: .json, .csv or .png mask (red: tumor, green: TIL)")
    c.add_argument("--layout-from", type=Path, default=None, metavar="STORE",
                   help="take the layout from a real slide's tiles in this split store")
    c.add_argument("--slide", default=None, help="slide id in --layout-from")
    c.add_argument("--region", type=non_negative_int, nargs=4, default=None,
                   metavar=("X", "Y", "W", "H"), help="level-0 region of --slide")
    c.add_argument("--layout-mode", choices=("centre", "blend"), default="centre",
                   help="a window takes the region under its centre, or a blend of the "
                        "embeddings of the regions it covers (default: centre)")
    m = p.add_argument_group("model")
    add_checkpoint_args(m)
    s = p.add_argument_group("sampling")
    s.add_argument("--size", type=positive_int, nargs=2, default=(1024, 1024),
                   metavar=("W", "H"), help="image size in pixels (default: 1024 1024)")
    s.add_argument("--overlap", type=non_negative_float, default=0.25,
                   help="window overlap: a fraction of the window below 1, else latent pixels "
                        "(default: 0.25)")
    s.add_argument("--weighting", choices=("uniform", "gaussian"), default="uniform",
                   help="window weights where windows overlap (default: uniform)")
    s.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    s.add_argument("--guidance", "--scale", dest="guidance", type=non_negative_float,
                   default=1.75, help="classifier-free guidance scale (default: 1.75)")
    s.add_argument("--eta", type=unit_float, default=0.0, help="DDIM eta (default: 0)")
    s.add_argument("--seed", type=seed_int, default=0,
                   help="seed; the noise is sample.py's first image's (default: 0)")
    s.add_argument("--batch", type=positive_int, default=16,
                   help="windows per U-Net forward (default: 16)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    d = p.add_argument_group("decoding and output")
    d.add_argument("--decode-tile", type=positive_int, default=64,
                   help="decoder tile in latent pixels (default: 64)")
    d.add_argument("--decode-overlap", type=non_negative_int, default=16,
                   help="decoder tile overlap in latent pixels (default: 16)")
    d.add_argument("--check-decode", action="store_true",
                   help="also decode the latent whole and record how far the tiled decode is "
                        "from it (uint8 levels) in metadata.json")
    d.add_argument("--png-max-pixels", type=positive_int, default=64 * 2 ** 20,
                   help="largest image written as PNG; larger ones become a TIFF (default: 64 Mpx)")
    d.add_argument("--tiff", action="store_true", help="also write the pyramidal TIFF")
    d.add_argument("--magnification", type=positive_float, default=10.0,
                   help="the training patches' magnification (default: 10, the paper's)")
    d.add_argument("--mpp", type=positive_float, default=None,
                   help="microns per pixel of the TIFF (default: 10 / magnification)")
    d.add_argument("--outdir", type=Path, default=Path("outputs/large"),
                   help="output folder (default: outputs/large)")
    d.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def read_layout_args(args: argparse.Namespace) -> Any:
    """The layout of --layout or --layout-from, or None for one condition everywhere."""
    from ldm.layout import layout_from_store, read_layout

    if args.layout is not None and args.layout_from is not None:
        raise ValueError("give --layout or --layout-from, not both")
    if args.layout is not None:
        return read_layout(args.layout, args.summary)
    if args.layout_from is None:
        if args.slide is not None or args.region is not None:
            raise ValueError("--slide and --region go with --layout-from STORE")
        return None
    if args.slide is None or args.region is None:
        raise ValueError("--layout-from needs --slide ID and --region X Y W H")
    from ldm.evaluation.images import SplitStore

    layout = layout_from_store(SplitStore(args.layout_from, patch_size=None), args.slide,
                               args.region)
    if args.summary is not None:
        layout.summary = args.summary
    return layout


def single_condition(args: argparse.Namespace, kind: str) -> str | int | None:
    """The one caption or class label of an image without a layout."""
    from ldm.data.captions import caption_from_levels, class_label_from_levels

    if (args.tumor is None) != (args.til is None):
        raise ValueError("give --tumor and --til together")
    if kind == "none":
        return None
    if kind == "class":
        if args.class_label is not None:
            return args.class_label
        if args.tumor is None:
            raise ValueError("class-conditional model: give --class-label, --tumor/--til or a "
                             "layout")
        return class_label_from_levels(args.tumor, args.til)
    if args.class_label is not None:
        raise ValueError("--class-label is for class-conditional models; this one takes text")
    if args.prompt is not None:
        if args.tumor is not None or args.summary is not None:
            raise ValueError("give --prompt or --tumor/--til/--summary, not both")
        return args.prompt
    if args.tumor is None or args.summary is None:
        raise ValueError("text-conditional model: give --prompt, --tumor/--til with --summary, "
                         "or a layout with --summary")
    return caption_from_levels(args.tumor, args.til, args.summary)


def layout_condition(levels: tuple[str, str], summary: str | None, kind: str) -> str | int:
    """Caption (text models) or class label of a layout cell."""
    from ldm.data.captions import caption_from_levels
    from ldm.layout import class_label

    if kind == "class":
        return class_label(levels)
    if not (summary or "").strip():
        raise ValueError("a layout for a text model needs the slide's --summary")
    return caption_from_levels(levels[0], levels[1], summary)


def plan_regions(args: argparse.Namespace, kind: str, windows: Sequence[tuple[int, int]],
                 window: int, canvas: tuple[int, int]) -> dict[str, Any]:
    """Conditions of the regions and, for each window, ``[(region, weight), ...]``."""
    from ldm.layout import window_cells

    layout = read_layout_args(args)
    if layout is None:
        return {"layout": None, "conditions": [single_condition(args, kind)],
                "windows": [[(0, 1.0)] for _ in windows]}
    if kind == "none":
        raise ValueError("an unconditional model takes no layout")
    if args.prompt or args.tumor or args.til or args.class_label is not None:
        raise ValueError("a layout sets the levels: drop --prompt/--tumor/--til/--class-label")
    cells = layout.distinct()
    conds = [layout_condition(cell, layout.summary, kind) for cell in cells]
    per_window = [[(cells.index(cell), w) for cell, w in
                   window_cells(layout, (y, x, window, window), canvas, args.layout_mode)]
                  for y, x in windows]
    return {"layout": layout.to_json(), "conditions": conds, "windows": per_window}


def window_conditioning(model: Any, plan: dict[str, Any]) -> tuple[Any, Any]:
    """``cond_for(indices)`` and ``uncond_for(n)`` for the canvas sampler."""
    from ldm.data.captions import conditioning_batch
    from ldm.models.diffusion.multidiffusion import batch_cond, blend_cond

    if plan["conditions"] == [None]:
        return (lambda idx: None), None
    # one forward per condition, as sample.py encodes a batch of one
    embedded = [model.get_conditioning(conditioning_batch([c])) for c in plan["conditions"]]
    blends: dict[tuple, Any] = {}

    def of_window(parts: list[tuple[int, float]]) -> Any:
        if len(parts) == 1:
            return embedded[parts[0][0]]
        key = tuple(parts)
        if key not in blends:
            blends[key] = blend_cond([embedded[k] for k, _ in parts], [w for _, w in parts])
        return blends[key]

    def cond_for(idx: Sequence[int]) -> Any:
        return batch_cond([of_window(plan["windows"][i]) for i in idx])

    uc1 = model.get_unconditional_conditioning(1)
    return cond_for, (lambda n: batch_cond([uc1] * n))


def downsampling_factor(model: Any) -> int:
    """Pixels per latent pixel of the model's first stage."""
    decoder = getattr(model.first_stage_model, "decoder", None)
    if decoder is None or not hasattr(decoder, "num_resolutions"):
        raise ValueError(f"cannot tell the downsampling of {type(model.first_stage_model)}")
    return 2 ** (decoder.num_resolutions - 1)


def canvas_shape(args: argparse.Namespace, factor: int, window: int) -> tuple[int, int]:
    """Latent ``(height, width)`` of ``--size``, checked against the factor and the window."""
    w, h = args.size
    if w % factor or h % factor:
        raise ValueError(f"--size {w} {h}: both must be multiples of {factor} px (the "
                         "autoencoder's downsampling)")
    if w < window * factor or h < window * factor:
        raise ValueError(f"--size {w} {h}: the model's patches are {window * factor} px; give at "
                         "least that, or use sample.py")
    return h // factor, w // factor


def generate(model: Any, args: argparse.Namespace, kind: str,
             device: Any) -> tuple[Any, dict[str, Any]]:
    """Sample the canvas and decode it; returns the uint8 image and the run's facts."""
    import torch

    from ldm.evaluation.images import to_uint8
    from ldm.evaluation.sampling import image_seed, initial_noise
    from ldm.models.diffusion.ddim import DDIMSchedule, model_denoiser
    from ldm.models.diffusion.multidiffusion import overlap_pixels, sample_canvas, window_grid
    from ldm.models.tiled_decode import decode_tiled

    factor, window = downsampling_factor(model), int(model.image_size)
    lh, lw = canvas_shape(args, factor, window)
    overlap = overlap_pixels(args.overlap, window)
    windows = window_grid(lh, lw, window, overlap)
    plan = plan_regions(args, kind, windows, window, (lh, lw))
    logger.info("%dx%d px: %dx%d latent, %d windows of %d (overlap %d)", args.size[0],
                args.size[1], lw, lh, len(windows), window, overlap)
    seed = image_seed(args.seed, 0)
    with torch.no_grad():
        x_T = initial_noise([seed], (model.channels, lh, lw), device)
        cond_for, uncond_for = window_conditioning(model, plan)
        sched = DDIMSchedule.make(model.alphas_cumprod, args.steps, args.eta)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        z = sample_canvas(model_denoiser(model), x_T, sched, windows, window, cond_for,
                          uncond_for if args.guidance != 1.0 else None, args.guidance,
                          args.weighting, args.batch)
        t1 = time.perf_counter()
        decoder = getattr(model.first_stage_model, "decoder", None)
        tiled = decode_tiled(model.decode_first_stage, z, factor, args.decode_tile,
                             args.decode_overlap, norm_module=decoder)
        image = to_uint8(tiled)[0]
        t2 = time.perf_counter()
        check = decode_check(model, z, tiled) if args.check_decode else None
    facts = {"factor": factor, "window": window, "overlap_latent_px": overlap,
             "latent_size": [lw, lh], "windows": [list(w) for w in windows], "plan": plan,
             "noise_seed": seed, "sampling_seconds": t1 - t0, "decode_seconds": t2 - t1,
             "decode_check": check}
    return image, facts


def decode_check(model: Any, z: Any, tiled: Any) -> dict[str, float]:
    """Mean and maximum absolute difference, in uint8 levels, of a tiled and a whole decode."""
    whole = model.decode_first_stage(z)
    diff = (tiled.clamp(-1, 1) - whole.clamp(-1, 1)).abs() * 127.5
    return {"mean_abs_levels": float(diff.mean()), "max_abs_levels": float(diff.max())}


def seam_metrics(image: Any, facts: dict[str, Any]) -> dict[str, float] | None:
    """Seam score of the window borders (None for one window)."""
    from ldm.evaluation.large_images import seam_score, window_borders

    w, f = facts["window"], facts["factor"]
    lw, lh = facts["latent_size"]
    ys = sorted({y for y, _ in facts["windows"]})
    xs = sorted({x for _, x in facts["windows"]})
    bx, by = window_borders(xs, w, lw, f), window_borders(ys, w, lh, f)
    return seam_score(image, bx, by, period=f) if bx or by else None


def peak_memory(device: Any) -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory."""
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss_mib": round(rss, 1)}
    if getattr(device, "type", str(device)) == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point."""
    from ldm.checkpoint import load_model, set_trust
    from ldm.evaluation.images import save_png, write_json
    from ldm.evaluation.sampling import check_steps, conditioning_kind
    from ldm.pyramid_tiff import mpp_of_magnification, write_pyramid_tiff

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    set_trust(args.trust_checkpoint)
    device = resolve_device(args.device)
    loaded = load_model(args.ckpt, config=args.config, weights=args.weights)
    model = loaded.model.to(device)
    check_steps(model, args.steps)
    kind = conditioning_kind(model)
    args.outdir.mkdir(parents=True, exist_ok=True)
    image, facts = generate(model, args, kind, device)
    mpp = args.mpp or mpp_of_magnification(args.magnification)
    outputs = []
    if image.shape[0] * image.shape[1] <= args.png_max_pixels:
        save_png(image, args.outdir / "image.png")
        outputs.append("image.png")
    if args.tiff or not outputs:
        levels = write_pyramid_tiff(args.outdir / "image.tiff", image, mpp, args.magnification)
        outputs.append("image.tiff")
        facts["tiff_levels"] = [list(s) for s in levels]
    plan = facts.pop("plan")
    meta = {"checkpoint": str(loaded.checkpoint_path.resolve()),
            "global_step": loaded.global_step, "weights": loaded.weights, "conditioning": kind,
            "size": list(args.size), "overlap": args.overlap, "weighting": args.weighting,
            "steps": args.steps, "guidance": args.guidance, "eta": args.eta, "seed": args.seed,
            "batch": args.batch, "sampler": "DDIM (MultiDiffusion canvas)",
            "decode_tile": args.decode_tile, "decode_overlap": args.decode_overlap,
            "magnification": args.magnification, "mpp": mpp, "layout_mode": args.layout_mode,
            "layout": plan["layout"], "conditions": plan["conditions"],
            "window_regions": plan["windows"], "outputs": outputs,
            "seam_score": seam_metrics(image, facts), **facts, **peak_memory(device)}
    write_json(meta, args.outdir / "metadata.json")
    print(f"{args.size[0]}x{args.size[1]} px from {len(facts['windows'])} windows in "
          f"{facts['sampling_seconds']:.1f} s: {', '.join(outputs)} in {args.outdir}")
    return meta


if __name__ == "__main__":
    run_main(main)
