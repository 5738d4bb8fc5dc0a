#!/usr/bin/env python
"""PathLDM quick start on CPU: from the bundled demo slide to generated patches in minutes.

Runs, offline and with no pretrained weights:
  1. data preparation of data/demo/ (tiling, tumor/TIL stand-in, summaries, training store);
  2. a tiny random CLIP text tower with the real CLIP tokenizer;
  3. a tiny VQ-f4 first stage, trained briefly on the demo patches (pixel L1 + codebook loss),
     and the latents of every patch and its flips, encoded once (scripts/cache_latents.py);
  4. a tiny caption-conditioned LDM trained with main.py on them: configs/demo/ldm_tiny.yaml
     with the overlay configs/demo/ldm_tiny_levels.yaml (the caption's tumor/TIL levels as a
     vector, its summary through the text tower into cross-attention);
  5. DDIM samples with classifier-free guidance for the four tumor/TIL captions, made with
     scripts/sample.py --all-levels from the run's last.ckpt (grid.png: one row per caption);
  6. the caption-adherence check (ldm.evaluation.adherence): how far the tumor and TIL levels
     of the captions move the samples' stand-in statistics, against the real patches' gap;
     printed and written to samples/adherence.json;
  7. scripts/evaluate.py on the samples against the training store, in the feature space of a
     tiny random CLIP (no weights to download: the numbers show the evaluation running, not
     image quality); report in evaluation/report.md.

Everything goes to --out (default outputs/demo); finished stages are skipped on a rerun.
The tiny model only shows the pipeline working end to end: expect blurry H&E-coloured
textures, not realistic tissue.

Example:
  python scripts/demo.py
  python scripts/sample.py --ckpt outputs/demo/logs/<run> --tumor high --til low \\
      --summary "invasive ductal carcinoma" --n 8 --outdir outputs/demo/more_samples
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("demo")
LDM_CONFIG = ROOT / "configs" / "demo" / "ldm_tiny.yaml"
# The levels of the caption as a vector into the U-Net's label_emb, its summary as text into
# cross-attention (an overlay on LDM_CONFIG). Text alone learns the tumor level in the demo's
# few hundred steps but not the TIL level, which is mostly texture (README, "Quick start").
LEVELS_OVERLAY = ROOT / "configs" / "demo" / "ldm_tiny_levels.yaml"
DEMO_GUIDANCE = 1.75


# Explicit tiling (not data_prep's defaults, which may change): 64-px tiles at 10x, the LDM's
# training size, so the stand-in tumor/TIL labels are computed on exactly the image the model
# sees (labels of larger tiles only loosely describe a random 64-px crop of them).
DEMO_TILING = {"magnification": 10.0, "tile_size": 64, "stride": 32, "min_tissue": 0.25}


def prepare_data(out: Path) -> Path:
    """Training store of the demo slide (data_prep's four steps)."""
    from data_prep.demo import run_demo

    train = out / "dataset" / "train.h5"
    if not train.is_file():
        run_demo(out, **DEMO_TILING)
    return train


def text_encoder(out: Path) -> Path:
    """A tiny offline CLIP text tower (random weights, real tokenizer)."""
    from ldm.modules.encoders.tiny import build_tiny_clip_text_encoder

    if not (out / "config.json").is_file():
        build_tiny_clip_text_encoder(out, hidden_size=32, num_layers=2, num_heads=2,
                                     intermediate_size=64, seed=0)
    return out


def train_vq(store: Path, out: Path, steps: int, seed: int) -> Path:
    """Train the demo config's VQ-f4 with L1 + codebook loss; save a checkpoint.

    It is fully convolutional, so 32x32 crops (4x cheaper) train it for the LDM's 64x64 crops.

    (The paper fine-tunes a pretrained VQ-f4 with LPIPS and a discriminator, see
    configs/autoencoder/; neither pretrained weights nor VGG are available offline.)
    """
    import torch
    from tqdm import tqdm

    from ldm.config import read_yaml
    from ldm.data.tcga import TCGAPatchDataset
    from ldm.util import instantiate_from_config

    ckpt = out / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    cfg = read_yaml(LDM_CONFIG).model.params.first_stage_config
    cfg.params.pop("ckpt_path", None)
    torch.manual_seed(seed)
    vq = instantiate_from_config(cfg).train()
    data = torch.utils.data.DataLoader(TCGAPatchDataset(store, size=32, seed=seed),
                                       batch_size=16, shuffle=True, drop_last=True)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    bar = tqdm(total=steps, desc="VQ-f4", unit="step")
    while bar.n < steps:
        for batch in data:
            x = batch["image"].permute(0, 3, 1, 2)
            quant, codebook_loss, _ = vq.quantize(vq.encode(x))
            rec = (vq.decoder(vq.post_quant_conv(quant)) - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            (rec + codebook_loss).backward()
            opt.step()
            bar.update()
            bar.set_postfix(l1=f"{rec.item():.3f}")
            if bar.n >= steps:
                break
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": vq.state_dict(), "global_step": steps}, ckpt.with_suffix(".tmp"))
    ckpt.with_suffix(".tmp").replace(ckpt)
    return ckpt


def cache_latents(store: Path, vq: Path, out: Path) -> Path:
    """The VQ latents of every tile and its flips (scripts/cache_latents.py), encoded once.

    LDM training then skips the frozen encoder at every step; flips stay exact.
    """
    from ldm.config import read_yaml
    from ldm.data.latents import cache_latents as encode_all
    from ldm.evaluation.reconstruction import load_first_stage

    if not out.is_file():
        encode_all(store, load_first_stage(read_yaml(LDM_CONFIG), vq), out, flips=True,
                   device="cpu")
    return out


def train_ldm(store: Path, latents: Path, vq: Path, text: Path, logdir: Path, steps: int,
              seed: int) -> Path:
    """Train configs/demo/ldm_tiny.yaml with main.py on cached latents; the run directory."""
    import main
    from ldm.checkpoint import read_checkpoint

    done = [r for r in sorted(logdir.glob("*_demo")) if (r / "checkpoints" / "last.ckpt").is_file()
            and read_checkpoint(r / "checkpoints" / "last.ckpt").get("global_step") == steps]
    if done:
        return done[-1]
    before = set(logdir.glob("*_demo"))
    code = main.main([
        "--base", str(LDM_CONFIG), str(LEVELS_OVERLAY), "-t", "--accelerator", "cpu",
        "-l", str(logdir), "-n", "demo",
        "-s", str(seed), f"data.params.train.path={store}",
        f"data.params.train.latents_path={latents}",
        f"model.params.first_stage_config.params.ckpt_path={vq}",
        f"model.params.cond_stage_config.params.embedders.text.params.version={text}",
        f"lightning.trainer.max_steps={steps}",
        f"lightning.modelcheckpoint.params.every_n_train_steps={steps}",
        f"lightning.callbacks.image_logger.params.batch_frequency={steps}"])
    if code != 0:
        raise RuntimeError(f"main.py failed with exit code {code}")
    return max(set(logdir.glob("*_demo")) - before)


def sample(run: Path, store: Path, out: Path, n: int, steps: int, scale: float,
           seed: int) -> Path:
    """The four tumor/TIL captions with the slide's summary, the same seeds in every row.

    ``scripts/sample.py --all-levels``: grid.png has one labelled row per combination.
    """
    import h5py

    from ldm.data.store import read_slide_summaries

    with h5py.File(store, "r") as f:
        summary = (read_slide_summaries(f)[0] or [""])[0]
    subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "--ckpt", str(run),
                    "--all-levels", "--summary", summary, "--n", str(n),
                    "--batch-size", str(n), "--steps", str(steps), "--scale", str(scale),
                    "--seed", str(seed), "--device", "cpu", "--outdir", str(out)], check=True)
    return out / "grid.png"


def check_adherence(store: Path, samples: Path) -> dict:
    """Do the captions steer the samples? Real vs generated level gaps, also as JSON."""
    from ldm.evaluation.adherence import check_adherence as check

    return check(store, samples, samples / "adherence.json")


def evaluate(store: Path, samples: Path, out: Path) -> dict:
    """scripts/evaluate.py with a tiny random CLIP as the extractor; its results JSON."""
    import json

    from ldm.evaluation.tiny import build_tiny_clip

    clip = build_tiny_clip(out / "tiny_clip")
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--samples",
           f"demo={samples}", "--reference", str(store), "--extractor", f"hf:{clip}",
           "--kid-subset-size", "100", "--min-stratum", "5", "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/evaluate.py failed: {proc.stderr.strip()[-2000:]}")
    return json.loads((out / "results.json").read_text())


def format_evaluation(results: dict) -> str:
    """Two lines of the evaluation summary."""
    (spec, per_set), = results["metrics"].items()
    m = {"precision": float("nan"), "recall": float("nan"), "density": float("nan"),
         "coverage": float("nan"), **per_set["demo"]["overall"]}  # PRDC needs more than k
    mem = results["memorisation"][spec]["demo"]
    probe = results["probe"][spec]["demo"]
    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    acc = " ".join(f"{t} {num(probe[t].get('samples_accuracy'))} (real "
                   f"{num(probe[t].get('real_held_out_accuracy'))})" for t in ("tumor", "til"))
    return (f"evaluation (tiny random CLIP features): FD {m['fd']:.3f}, KID {m['kid']:.4f}, "
            f"precision {m['precision']:.2f}, recall {m['recall']:.2f}, density "
            f"{m['density']:.2f}, coverage {m['coverage']:.2f}\n"
            f"  memorised {mem['n_flagged']}/{m['n_fake']}; probe accuracy {acc}")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (sampling runs as a subprocess).

    Printed next to each stage's wall time: on a busy machine wall time grows, CPU time less.
    """
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from ldm.argtypes import non_negative_float, positive_int, seed_int

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    p.add_argument("--vq-steps", type=positive_int, default=300,
                   help="VQ training steps (batch 16 of 32x32 crops)")
    p.add_argument("--ldm-steps", type=positive_int, default=600,
                   help="LDM training steps (batch 16)")
    p.add_argument("--n", type=positive_int, default=12,
                   help="samples per tumor/TIL caption (the adherence check's sample size)")
    p.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=non_negative_float, default=DEMO_GUIDANCE,
                   help="classifier-free guidance scale of the samples")
    p.add_argument("--seed", type=seed_int, default=0)
    args = p.parse_args(argv)
    from ldm.evaluation.adherence import format_report

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out.resolve()
    times: dict[str, tuple[float, float]] = {}
    start = time.time()

    def timed(name, fn, *a):
        t, cpu = time.time(), cpu_seconds()
        result = fn(*a)
        times[name] = (time.time() - t, cpu_seconds() - cpu)
        return result

    try:
        store = timed("data preparation", prepare_data, out / "data")
        text = timed("text encoder", text_encoder, out / "text_encoder")
        vq = timed("VQ-f4 training", train_vq, store, out / "vq", args.vq_steps, args.seed)
        latents = timed("latent cache", cache_latents, store, vq, out / "vq" / "latents.h5")
        run = timed("LDM training", train_ldm, store, latents, vq, text, out / "logs",
                    args.ldm_steps, args.seed)
        grid = timed("sampling", sample, run, store, out / "samples", args.n,
                     args.sample_steps, args.scale, args.seed)
        report = timed("adherence check", check_adherence, store, out / "samples")
        evaluation = timed("evaluation", evaluate, store, out / "samples", out / "evaluation")
    except (RuntimeError, ValueError, subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    print(f"\nPathLDM demo finished in {time.time() - start:.0f} s")
    for name, (wall, cpu) in times.items():
        print(f"  {name:<18} {wall:6.1f} s ({cpu:6.1f} CPU-s)")
    print(format_report(report))
    print(format_evaluation(evaluation))
    print(f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}\n"
          f"samples:    {grid} (one row per tumor/TIL combination)\n"
          f"adherence:  {out / 'samples' / 'adherence.json'}\n"
          f"evaluation: {out / 'evaluation' / 'report.md'}")
    print(f"more:       python scripts/sample.py --ckpt {run} --tumor high --til high "
          f"--summary \"...\" --n 8 --outdir {out / 'more_samples'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
