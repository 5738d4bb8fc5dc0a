#!/usr/bin/env python
"""FID/KID of a text- or class-conditional LDM against real patches (pytorch-fid's Inception).

Subcommands:
  ref-stats  Inception statistics of real patches (split store or image folder) in
             pytorch-fid's npz format (mu, sigma), plus a features sidecar for KID.
  generate   N samples (10,000 by default) whose captions are drawn from a split store:
             --prompt-sampling uniform (default, the paper's protocol) draws the tumor/TIL
             combination uniformly and a summary of a uniformly drawn slide; data takes a real
             patch's levels and one summary of its slide. Resumable (existing PNGs are kept)
             and shardable (--shard i/n). --format store writes HDF5 parts in the split-store
             layout instead of PNGs (paper-scale CAS sets: millions of patches).
  score      FID and KID of generated folders against reference statistics or images.
  sweep      generate + score for several guidance scales (--scales) with prompts from the
             train and the held-out test split, reported side by side.
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
    int_in,
    non_negative_float,
    non_negative_int,
    positive_int,
    seed_int,
    unit_float,
)
from ldm.evaluation.cli import (
    add_checkpoint_args,
    configure_logging,
    format_table,
    parse_shard,
    resolve_device,
    run_main,
)
from ldm.evaluation.fid import (
    DIMS,
    FID_WEIGHTS_FILE,
    extract_features,
    inception_protocol,
    load_inception,
    load_statistics,
    save_statistics,
)
from ldm.evaluation.images import (
    SplitStore,
    list_image_files,
    open_images,
    pil_transform,
    write_json,
    write_text,
)
from ldm.evaluation.metrics import feature_statistics, frechet_distance, kid
from ldm.evaluation.protocol import read_stats_protocol, stats_protocol, write_stats_protocol
from ldm.evaluation.sampling import PROMPT_SAMPLINGS

logger = logging.getLogger("fid")

EXAMPLES = """examples:
  python scripts/fid.py ref-stats --images data/tcga_brca/train.h5 --n 10000 --out ref_train.npz
  python scripts/fid.py generate --ckpt logs/RUN --store data/tcga_brca/test.h5 --outdir gen/test \\
      --n 10000 --shard 0/4 --device cuda:0
  python scripts/fid.py score --ref ref_train.npz --samples gen/train gen/test --out fid.json
  python scripts/fid.py sweep --ckpt logs/RUN --ref ref_train.npz --outdir sweep \\
      --train-store data/tcga_brca/train.h5 --test-store data/tcga_brca/test.h5 \\
      --scales 0.1 0.5 1 1.5 1.75 2 3 --n 10000
"""


def _add_inception_args(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    g = p.add_argument_group("Inception")
    g.add_argument("--dims", type=int, default=2048, choices=DIMS,
                   help="Inception feature block (2048 = pool3, the standard FID)")
    g.add_argument(batch_flag, dest="fid_batch_size", type=positive_int, default=50,
                   help="images per Inception forward pass")
    g.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="DataLoader workers for reading")
    g.add_argument("--inception-weights", type=Path, default=None,
                   help=f"path to {FID_WEIGHTS_FILE}; unset: the torch hub cache "
                        "$TORCH_HOME/hub/checkpoints (downloaded there if missing)")
    g.add_argument("--no-download", action="store_true",
                   help="never try to download the Inception weights")
    g.add_argument("--kid-subsets", type=positive_int, default=100, help="KID: number of subsets")
    g.add_argument("--kid-subset-size", type=int_in(2), default=1000,
                   help="KID: samples per subset")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and sampling")
    add_checkpoint_args(g)
    g.add_argument("--steps", type=positive_int, default=50, help="DDIM steps")
    g.add_argument("--eta", type=unit_float, default=0.0, help="DDIM eta in [0, 1]")
    g.add_argument("--batch-size", type=positive_int, default=16, help="images per sampling batch")
    g.add_argument("--seed", type=seed_int, default=0, help="seed of captions and noise")
    g.add_argument("--n", type=positive_int, default=10_000, help="samples per prompt split")
    g.add_argument("--prompt-sampling", choices=PROMPT_SAMPLINGS, default="uniform",
                   help="uniform: tumor/TIL combination (class) uniformly, summary of a slide "
                        "drawn uniformly over slides, as the paper; data: a random real patch's "
                        "levels and a summary of its slide (the data's distribution)")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    """Options of ``generate``: prompt store, guidance, output folder or store, shard."""
    p.add_argument("--store", required=True, type=Path,
                   help="split store whose patches/summaries give the captions")
    p.add_argument("--split-name", default=None, help="label of the prompt split "
                   "(default: the store's 'split' attribute)")
    p.add_argument("--scale", type=non_negative_float, default=1.75,
                   help="classifier-free guidance scale")
    p.add_argument("--outdir", required=True, type=Path, help="folder for PNGs and metadata")
    p.add_argument("--shard", default="0/1", help="i/n: generate indices with index %% n == i "
                   "(with --format store: the parts with part %% n == i)")
    p.add_argument("--format", choices=("png", "store"), default="png",
                   help="png: one PNG per sample and samples.jsonl (FID); store: HDF5 parts "
                        "OUTDIR/part-NNNNNN.h5 in the split-store layout, each written "
                        "atomically, the levels in tumor_prob/til_prob as 0 (low) or 1 (high) "
                        "(CAS at the paper's scale: scripts/cas.py --synthetic OUTDIR)")
    p.add_argument("--part-size", type=positive_int, default=10_000,
                   help="--format store: samples per part file (the unit of resuming)")
    p.add_argument("--jpeg-quality", type=int_in(1, 95), default=95,
                   help="--format store: JPEG quality of the stored samples")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    kw = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter, "parents": [common]}

    p = sub.add_parser("ref-stats", **kw, help="reference statistics of real images")
    p.add_argument("--images", required=True, type=Path, help="split store (.h5) or image folder")
    p.add_argument("--out", required=True, type=Path, help="output .npz (pytorch-fid format)")
    p.add_argument("--n", type=positive_int, default=None, help="random subset of this many images")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the subset")
    p.add_argument("--center-crop", type=positive_int, default=None,
                   help="centre crop to this size first")
    p.add_argument("--resize", type=positive_int, default=None,
                   help="bicubic resize (e.g. 299); the network resizes to 299 bilinearly anyway")
    p.add_argument("--no-features", action="store_true",
                   help="do not keep raw features (KID against these statistics impossible)")
    _add_inception_args(p)

    p = sub.add_parser("generate", **kw, help="generate samples for FID")
    _add_model_args(p)
    _add_generate_args(p)

    p = sub.add_parser("score", **kw, help="FID/KID of generated folders")
    p.add_argument("--ref", required=True, type=Path,
                   help="reference .npz (ref-stats), split store or image folder")
    p.add_argument("--samples", required=True, nargs="+", type=Path, help="generated folders")
    p.add_argument("--out", type=Path, default=Path("fid_results.json"), help="JSON results")
    p.add_argument("--center-crop", type=positive_int, default=None,
                   help="centre crop (images only)")
    p.add_argument("--resize", type=positive_int, default=None,
                   help="bicubic resize (images only)")
    _add_inception_args(p)

    p = sub.add_parser("sweep", **kw, help="guidance-scale sweep (generate+score)")
    _add_model_args(p)
    p.add_argument("--ref", required=True, type=Path, help="reference .npz, store or folder")
    p.add_argument("--train-store", type=Path, default=None, help="train split store (prompts)")
    p.add_argument("--test-store", type=Path, default=None, help="held-out split store (prompts)")
    p.add_argument("--scales", type=non_negative_float, nargs="+",
                   default=[0.1, 0.5, 1.0, 1.5, 1.75, 2.0, 2.5, 3.0], help="guidance scales")
    p.add_argument("--outdir", required=True, type=Path, help="folder of scale_*/<split>/ runs")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default: OUTDIR/sweep_results.json)")
    p.set_defaults(shard="0/1", center_crop=None, resize=None, format="png")
    _add_inception_args(p, batch_flag="--fid-batch-size")
    return parser


def _inception(args: argparse.Namespace) -> Any:
    return load_inception(args.dims, weights=args.inception_weights,
                          allow_download=not args.no_download, device=resolve_device(args.device))


def _features(model: Any, path: Path, args: argparse.Namespace, n: int | None = None,
              seed: int = 0) -> Any:
    dataset = open_images(path, n=n, seed=seed,
                          transform=pil_transform(args.center_crop, args.resize), one_size=True)
    logger.info("%s: %d images", path, len(dataset))
    return extract_features(model, dataset, batch_size=args.fid_batch_size,
                            num_workers=args.num_workers, desc=path.name)


def cmd_ref_stats(args: argparse.Namespace) -> dict[str, Any]:
    """Write reference statistics of real images."""
    if args.out.suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {args.out}")
    open_images(args.images, transform=pil_transform(args.center_crop, args.resize),
                one_size=True)  # every input checked before the network loads
    model = _inception(args)
    feats = _features(model, args.images, args, n=args.n, seed=args.seed)
    mu, sigma = feature_statistics(feats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_statistics(args.out, mu, sigma, features=None if args.no_features else feats)
    write_stats_protocol(args.out, stats_protocol(_requested_protocol(model, args), args.images,
                                                  args.n, args.seed, len(feats)))
    logger.info("wrote %s (%d images, %d dims)", args.out, len(feats), feats.shape[1])
    return {"out": str(args.out), "n": len(feats), "dims": int(feats.shape[1])}


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix runs: an existing generation.json must match (``n`` may grow)."""
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if k != "n" and old.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{path.parent} holds samples generated with other settings "
                             f"({details}); use another --outdir")
        settings = {**settings, "n": max(int(old.get("n", 0)), settings["n"])}
    write_json(settings, path)


def cmd_generate(args: argparse.Namespace, loaded: Any = None) -> dict[str, Any]:
    """Generate (a shard of) N samples with captions from a split store."""
    from ldm.checkpoint import load_model
    from ldm.evaluation.sampling import (
        caption_plan,
        check_steps,
        conditioning_kind,
        generate_to_folder,
        plan_condition,
        warn_long_prompts,
    )

    shard, n_shards = parse_shard(args.shard)
    store = SplitStore(args.store)
    split = args.split_name or str(store.attrs.get("split") or args.store.stem)
    device = resolve_device(args.device)
    if loaded is None:
        loaded = load_model(args.ckpt, config=args.config, weights=args.weights)
    model = loaded.model.to(device)
    check_steps(model, args.steps)
    kind = conditioning_kind(model)
    args.outdir.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(loaded.checkpoint_path.resolve()), "weights": loaded.weights,
                "store": str(args.store.resolve()), "split": split, "conditioning": kind,
                "steps": args.steps, "scale": args.scale, "eta": args.eta, "seed": args.seed,
                "prompt_sampling": args.prompt_sampling, "n": args.n}
    if args.format == "store":
        settings.update(format="store", part_size=args.part_size, jpeg_quality=args.jpeg_quality)
    _check_settings(args.outdir / "generation.json", settings)
    if args.format == "store":
        return _generate_parts(args, model, kind, store, settings, shard, n_shards)
    plan = caption_plan(store, args.n, seed=args.seed, sampling=args.prompt_sampling)
    for rec in plan:
        rec["file"] = f"{rec['index']:06d}.png"
    write_text("".join(json.dumps(r) + "\n" for r in plan), args.outdir / "samples.jsonl")
    mine = [r for r in plan if r["index"] % n_shards == shard]
    if kind == "text":
        warn_long_prompts(model, [r["caption"] for r in mine])
    items = [{"path": args.outdir / r["file"], "seed": r["seed"],
              "cond": plan_condition(r)} for r in mine]
    made = generate_to_folder(model, items, args.batch_size, args.steps, args.scale, args.eta,
                              desc=f"{split} s={args.scale:g} shard {shard}/{n_shards}")
    logger.info("%s: %d new images (shard %d/%d holds %d)", args.outdir, made, shard, n_shards,
                len(items))
    return {"outdir": str(args.outdir), "generated": made, "shard_size": len(items)}


def part_path(outdir: Path, part: int) -> Path:
    """File of part ``part`` of a generated store (samples ``part * part_size`` onwards)."""
    return outdir / f"part-{part:06d}.h5"


def _generate_parts(args: argparse.Namespace, model: Any, kind: str, store: SplitStore,
                    settings: dict[str, Any], shard: int, n_shards: int) -> dict[str, Any]:
    """Generate this shard's missing parts of a generated store; each part is one HDF5 file."""
    from tqdm import tqdm

    from ldm.evaluation.sampling import make_sampler

    size = args.part_size
    mine = [b for b in range(math.ceil(args.n / size)) if b % n_shards == shard]
    todo = [b for b in mine if not part_path(args.outdir, b).is_file()]
    logger.info("%s: shard %d/%d holds %d parts of %d samples, %d to generate", args.outdir,
                shard, n_shards, len(mine), size, len(todo))
    count = sum(min(size, args.n - b * size) for b in todo)
    sampler = make_sampler(model) if todo else None
    with tqdm(total=count, desc=f"{settings['split']} shard {shard}/{n_shards}",
              unit="img") as bar:
        for b in todo:
            _write_part(args, model, sampler, kind, store, settings, b, bar)
    return {"outdir": str(args.outdir), "generated": count,
            "shard_size": sum(min(size, args.n - b * size) for b in mine)}


def _write_part(args: argparse.Namespace, model: Any, sampler: Any, kind: str,
                store: SplitStore, settings: dict[str, Any], part: int, bar: Any) -> None:
    """Sample part ``part`` batch by batch and write it as one split store."""
    import numpy as np

    from data_prep.hdf5io import encode_jpeg, write_split_store
    from ldm.evaluation.sampling import (
        caption_plan,
        plan_condition,
        sample_batch,
        warn_long_prompts,
    )

    start = part * args.part_size
    plan = caption_plan(store, min(args.part_size, args.n - start), seed=args.seed,
                        sampling=args.prompt_sampling, start=start)
    conds = [plan_condition(r) for r in plan]
    if kind == "text":
        warn_long_prompts(model, [r["caption"] for r in plan])
    images: list[np.ndarray] = []
    tile_size = 0
    for i in range(0, len(plan), args.batch_size):
        batch = plan[i:i + args.batch_size]
        out = sample_batch(model, sampler, conds[i:i + args.batch_size],
                           [r["seed"] for r in batch], steps=args.steps, scale=args.scale,
                           eta=args.eta)
        images += [encode_jpeg(img, quality=args.jpeg_quality) for img in out]
        tile_size = int(out.shape[1])
        bar.update(len(batch))
    level = {"low": 0.0, "high": 1.0}
    write_split_store(
        part_path(args.outdir, part), images, [r["slide_index"] for r in plan],
        [level[r["tumor"]] for r in plan], [level[r["til"]] for r in plan],
        [str(x) for x in store.array("slides")], store.slide_summaries(),
        attrs={"split": "generated", "generated_from": settings["split"], "part": part,
               "tile_size": tile_size,
               "generation": json.dumps(settings)},
        extra={"sample_index": np.array([r["index"] for r in plan], dtype=np.int64),
               "seed": np.array([r["seed"] for r in plan], dtype=np.int64),
               "class_label": np.array([r["class_label"] for r in plan], dtype=np.int32),
               "summary_index": np.array([r["summary_index"] for r in plan], dtype=np.int32),
               "caption": np.array([r["caption"] for r in plan], dtype=object)})


def _requested_protocol(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    return inception_protocol(model, args.dims, args.center_crop, args.resize)


def _reference(model: Any, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    if args.ref.suffix == ".npz":
        args.reference_protocol = read_stats_protocol(args.ref, _requested_protocol(model, args))
        mu, sigma, feats = load_statistics(args.ref)
        if feats is None:
            logger.warning("%s has no features sidecar: KID skipped", args.ref)
        return mu, sigma, feats
    feats = _features(model, args.ref, args)
    return (*feature_statistics(feats), feats)


def _sample_meta(folder: Path) -> dict[str, Any]:
    path = folder / "generation.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    found = len(list_image_files(folder))
    if meta.get("n") and found < meta["n"]:
        logger.warning("%s: %d of %d samples present (generation incomplete?)", folder, found,
                       meta["n"])
    return meta


def score_folders(model: Any, args: argparse.Namespace, folders: Sequence[Path]) -> list[dict]:
    """FID (and KID when reference features exist) of each folder against ``args.ref``."""
    mu_r, sigma_r, feats_r = _reference(model, args)
    rows = []
    for folder in folders:
        meta = _sample_meta(folder)
        feats = _features(model, folder, args)
        row = {"samples": str(folder), "split": meta.get("split"), "scale": meta.get("scale"),
               "prompt_sampling": meta.get("prompt_sampling"), "n": len(feats),
               "fid": frechet_distance(*feature_statistics(feats), mu_r, sigma_r)}
        if feats_r is not None:
            row["kid"], row["kid_std"] = kid(feats, feats_r, num_subsets=args.kid_subsets,
                                             subset_size=args.kid_subset_size, seed=0)
        rows.append(row)
        logger.info("%s: FID %.4f", folder, row["fid"])
    return rows


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def render(rows: Sequence[dict[str, Any]], dims: int) -> str:
    """Flat table, plus train vs held-out FID side by side when both splits are present."""
    flat = format_table(
        ["samples", "prompts", "sampling", "scale", "n", f"FID ({dims})", "KID x1e3"],
        [[r["samples"], r["split"], r.get("prompt_sampling"), _fmt(r["scale"], "g"), r["n"],
          _fmt(r["fid"]),
          ("" if "kid" not in r else f"{1e3 * r['kid']:.3f} ± {1e3 * r['kid_std']:.3f}")]
         for r in rows])
    splits = list(dict.fromkeys(r["split"] for r in rows if r["split"]))
    if len(splits) < 2:
        return flat
    scales = list(dict.fromkeys(r["scale"] for r in rows))
    by = {(r["scale"], r["split"]): r for r in rows}
    headers = ["scale"] + [f"FID {s} prompts" for s in splits] + [f"KIDx1e3 {s}" for s in splits]
    table = [[_fmt(sc, "g")] + [_fmt(by.get((sc, s), {}).get("fid")) for s in splits]
             + [_fmt(1e3 * by[(sc, s)]["kid"]) if "kid" in by.get((sc, s), {}) else ""
                for s in splits] for sc in scales]
    return flat + "\n\n" + format_table(headers, table)


def _check_sources(args: argparse.Namespace, folders: Sequence[Path]) -> None:
    """Read the reference statistics and list every image source before any network runs."""
    if args.ref.suffix == ".npz":
        load_statistics(args.ref)
        read_stats_protocol(args.ref, {})  # readable; checked once the Inception is known
    else:
        open_images(args.ref, transform=pil_transform(args.center_crop, args.resize),
                    one_size=True)
    for folder in folders:
        open_images(folder, transform=pil_transform(args.center_crop, args.resize), one_size=True)


def cmd_score(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Score generated folders and write JSON + table."""
    for folder in args.samples:
        if not folder.is_dir():
            raise FileNotFoundError(f"samples folder not found: {folder}")
    _check_sources(args, args.samples)
    rows = score_folders(_inception(args), args, args.samples)
    _report(rows, args, args.out)
    return rows


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    sampling = sorted({str(r.get("prompt_sampling")) for r in rows})
    write_json({"reference": str(args.ref), "dims": args.dims,
                "reference_protocol": getattr(args, "reference_protocol", None),
                "prompt_sampling": sampling[0] if len(sampling) == 1 else sampling,
                "results": rows}, out)
    print(render(rows, args.dims))
    print(f"\nresults: {out}")


def cmd_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Generate and score per guidance scale with train and held-out prompts."""
    from ldm.checkpoint import load_model

    stores = [(name, s) for name, s in (("train", args.train_store), ("test", args.test_store))
              if s is not None]
    if not stores:
        raise ValueError("give --train-store and/or --test-store for the prompts")
    loaded = load_model(args.ckpt, config=args.config, weights=args.weights)
    folders = []
    for scale in args.scales:
        for name, store in stores:
            gen = argparse.Namespace(**vars(args))
            gen.scale, gen.store, gen.split_name = scale, store, name
            gen.outdir = args.outdir / f"scale_{scale:g}" / name
            cmd_generate(gen, loaded=loaded)
            folders.append(gen.outdir)
    loaded.model.cpu()  # free accelerator memory for the Inception
    rows = score_folders(_inception(args), args, folders)
    _report(rows, args, args.out or args.outdir / "sweep_results.json")
    return rows


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point."""
    from ldm.checkpoint import set_trust

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    set_trust(getattr(args, "trust_checkpoint", False))
    commands = {"ref-stats": cmd_ref_stats, "generate": cmd_generate, "score": cmd_score,
                "sweep": cmd_sweep}
    return commands[args.command](args)


if __name__ == "__main__":
    run_main(main)
