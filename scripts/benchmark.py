#!/usr/bin/env python
"""Training-step and sampling speed and peak memory of the diffusion U-Net of a config.

The U-Net, schedule and optimizer settings come from the config (``ckpt_path`` stripped, random
weights); latents are random ``(B, C, H, W)`` tensors and the text context a random
``(B, 154, context_dim)`` tensor, so no autoencoder, text tower or data is needed. Measured:

  train    one training step as LatentDiffusion does it (noise the latents at random t, predict
           eps, MSE, backward, optimizer step, zero_grad), with the model's own forward and
           configure_optimizers; median seconds over --steps after --warmup steps. One more
           step after those counts the convolution and matrix-multiply FLOPs (attention left
           out), work the architecture fixes, and the report gives the rate they run at over
           the median step time. The report also counts the denormal values in the
           optimizer state after the timed steps, which slow CPU arithmetic where near-zero
           updates produce them (--flush-denormal flushes them in both).
  sample   DDIM (--ddim-steps, eta 0) with classifier-free guidance (--scale, cond and uncond
           batched as one forward) through the project's DDIMSampler.
  denoise  the same guided DDIM loop written out around the bare denoiser call, so the
           original implementation (whose DDIMSampler needs CUDA) is timed identically.

Each measurement runs in a fresh subprocess (scripts/benchmark_worker.py). Memory: on CUDA the
peak of torch.cuda.max_memory_allocated; on CPU the peak resident set size (VmHWM) and its
increase over the resident size right after setup (model, optimizer and inputs built), where the
peak is reset (Linux).

--reference-src DIR runs the same measurements on the original implementation: DIR is a
checkout of cvlab-stonybrook/PathLDM or CompVis/latent-diffusion, put first on sys.path; its
ldm.modules.diffusionmodules.openaimodel.UNetModel is built with the same parameters, trained
with its own loss and ``torch.optim.AdamW(params, lr=lr)``, and called inside
``torch.cuda.amp.autocast()`` exactly as its LatentDiffusion.apply_model does (float16 on CUDA,
a no-op on CPU). Its backward runs under that same autocast: the original CheckpointFunction
recomputes the transformer blocks without restoring autocast and fails on mixed dtypes otherwise.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Each measurement runs this script in a fresh interpreter, so the original's `ldm` package
# never meets ours in one process.
WORKER = Path(__file__).resolve().with_name("benchmark_worker.py")
logger = logging.getLogger("benchmark")

EXAMPLES = """examples:
  python scripts/benchmark.py --device cpu                      # ours only, batch 2, fp32
  python scripts/benchmark.py --device cpu --reference-src ../PathLDM --out docs/benchmarks.md
  python scripts/benchmark.py --device cuda --reference-src ../PathLDM --out docs/benchmarks.md
"""
MEASURES = ("train", "sample", "denoise")
GB = 1024 ** 3


# ------------------------------------------------------------------------------------ spec
def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a worker needs, as plain data: model params, settings, inputs' shapes."""
    from omegaconf import OmegaConf

    from ldm.config import read_yaml

    cfg = read_yaml(args.config)
    if "model" not in cfg or "unet_config" not in cfg.model.get("params", {}):
        raise KeyError(f"{args.config}: expected model.params.unet_config (a LatentDiffusion "
                       "config)")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    params = copy.deepcopy(model["params"])
    unet = params["unet_config"]["params"]
    unet.pop("ckpt_path", None)
    if args.use_checkpoint != "config":
        unet["use_checkpoint"] = args.use_checkpoint == "true"
    for key in ("ckpt_path", "ignore_keys"):
        params.pop(key, None)
    # Frozen stages are not part of the measured step: latents and context come precomputed.
    params["first_stage_config"] = {"target": "torch.nn.Identity"}
    params["cond_stage_config"] = {"target": "torch.nn.Identity"}
    if params.get("use_ema"):
        logger.info("use_ema disabled: the comparison covers the U-Net step only")
    params["use_ema"] = False
    params["learning_rate"] = float(model.get("base_learning_rate", 1e-4))
    size = int(unet.get("image_size", params.get("image_size", 64)))
    if unet.get("context_dim") is None:
        raise ValueError(f"{args.config}: unet_config.params.context_dim is not set; this "
                         "benchmark measures the cross-attention (text-conditioned) U-Net")
    return {
        "target": model["target"], "params": params, "unet": unet,
        "lr": params["learning_rate"], "device": args.device, "batch": args.batch_size,
        "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
        "ddim_steps": args.ddim_steps, "scale": args.scale, "seed": args.seed,
        "threads": args.threads, "optimizer": args.optimizer,
        "flush_denormal": args.flush_denormal,
        "latent": [int(unet["in_channels"]), size, size],
        "context": [args.context_tokens, int(unet["context_dim"])],
        "reference_src": str(args.reference_src) if args.reference_src else None,
    }


# ----------------------------------------------------------------------------- orchestrator
def run_worker(spec_path: Path, impl: str, measure: str) -> dict[str, Any]:
    """One measurement in a fresh interpreter; raises with the worker's exit status."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, str(WORKER), str(spec_path), impl, measure, str(result_path)]
    logger.info("running %s %s", impl, measure)
    try:
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} {measure} measurement failed (exit {proc.returncode}); "
                               "see the log above")
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


def machine_info(spec: dict) -> str:
    """CPU model or GPU name, and the torch version."""
    import torch

    if spec["device"] == "cuda":
        hw = torch.cuda.get_device_name(0)
    else:
        hw = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                     if ln.startswith("model name")]
            hw = f"{names[0]} ({len(names)} logical CPUs)" if names else hw
    return f"{hw}; torch {torch.__version__}"


def _fmt_time(r: dict | None) -> str:
    if not r:
        return "-"
    ts = r["times"]
    med = statistics.median(ts)
    if len(ts) == 1:
        return f"{med:.2f} s"
    return f"{med:.2f} s (min {min(ts):.2f}, max {max(ts):.2f}, n={len(ts)})"


def _fmt_mem(r: dict | None, device: str) -> str:
    if not r:
        return "-"
    if device == "cuda":
        return f"{r['peak'] / GB:.2f} GiB"
    return f"{r['peak'] / GB:.2f} GiB (+{(r['peak'] - r['baseline']) / GB:.2f})"


def _fmt_flops(r: dict | None) -> str:
    if not r or not r.get("flops"):
        return "-"
    rate = r["flops"] / statistics.median(r["times"]) / 1e9
    return f"{r['flops'] / 1e9:.1f} GFLOP, {rate:.0f} GFLOP/s"


def _ratio(ref: dict | None, ours: dict | None, key: str, device: str) -> str:
    if not ref or not ours:
        return "-"
    if key == "flops":
        both = ref.get("flops") and ours.get("flops")
        return f"{ours['flops'] / ref['flops']:.3f}x the work" if both else "-"
    if key == "time":
        return f"{statistics.median(ref['times']) / statistics.median(ours['times']):.2f}x faster"
    if device == "cuda":
        return f"{ours['peak'] / ref['peak']:.2f}x memory"
    grow = lambda r: r["peak"] - r["baseline"]  # noqa: E731
    increase = f"{grow(ours) / grow(ref):.2f}x increase" if grow(ref) > 0 else "- increase"
    return f"{ours['peak'] / ref['peak']:.2f}x peak, {increase}"


def result_rows(results: dict, spec: dict) -> list[list[str]]:
    """Table rows: metric, original, ours, ours vs original."""
    dev, s = spec["device"], spec["ddim_steps"]
    mem = "peak memory" if dev == "cuda" else "peak RSS (+ over setup)"
    get = lambda impl, m: results.get((impl, m))  # noqa: E731
    rows = []
    for m, label in (("train", "training step (fwd+bwd+AdamW)"),
                     ("denoise", f"DDIM {s} steps, guided, denoiser loop"),
                     ("sample", f"DDIM {s} steps, guided, DDIMSampler")):
        ref, ours = get("reference", m), get("ours", m)
        if not ref and not ours:
            continue
        rows.append([f"{label}: time", _fmt_time(ref), _fmt_time(ours),
                     _ratio(ref, ours, "time", dev)])
        rows.append([f"{label}: {mem}", _fmt_mem(ref, dev), _fmt_mem(ours, dev),
                     _ratio(ref, ours, "mem", dev)])
        if any((r or {}).get("flops") for r in (ref, ours)):  # train only
            rows.append([f"{label}: conv+matmul FLOPs, rate", _fmt_flops(ref),
                         _fmt_flops(ours), _ratio(ref, ours, "flops", dev)])
    return rows


def _threads(spec: dict) -> str:
    import torch

    n = spec["threads"] or torch.get_num_threads()
    return f"{n} thread" + ("s" if n != 1 else "")


def markdown_section(key: str, rows: list[list[str]], spec: dict, command: str,
                     machine: str, load: str, notes: list[str]) -> str:
    """A self-contained Markdown section delimited by markers (replaced on the next run)."""
    lines = [f"<!-- benchmark:{key} -->",
             f"### {spec['device'].upper()}, batch {spec['batch']}, {spec['precision']}"
             + ("" if spec["device"] == "cuda" else f", {_threads(spec)}"),
             "", f"- date: {date.today().isoformat()}", f"- command: `{command}`",
             f"- machine: {machine}",
             f"- load average (1 min) before/after, this benchmark included: {load}"]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| metric | original (PathLDM) | ours | ours vs original |",
              "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [f"<!-- /benchmark:{key} -->"]
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, key: str, section: str) -> None:
    """Replace the section with this key in ``path`` (or append it); atomic write."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- benchmark:{key} -->", f"<!-- /benchmark:{key} -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def allocator_env(environ: Mapping[str, str]) -> list[str]:
    """``KEY=value`` for the allocator settings in ``environ``, to prefix the recorded command.

    They change CPU speed and memory. A preloaded library (``LD_PRELOAD``, e.g. jemalloc) is
    recorded by file name, which the dynamic linker also finds in its standard directories.
    """
    env = [f"{k}={v}" for k, v in sorted(environ.items())
           if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    preload = [Path(lib).name for lib in environ.get("LD_PRELOAD", "").replace(":", " ").split()]
    return env + ([f"LD_PRELOAD={':'.join(preload)}"] if preload else [])


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "pathldm.yaml",
                   help="LatentDiffusion config to read the U-Net and learning rate from")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, help="default 2 on CPU, 48 on CUDA")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="bf16 = bfloat16 autocast around forward and loss (default on CUDA)")
    p.add_argument("--steps", type=int, help="timed training steps (default 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, help="untimed first steps (default 1 CPU, 5 CUDA)")
    p.add_argument("--sample-runs", type=int, default=1, help="timed sampling runs")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=1.75, help="classifier-free guidance scale")
    p.add_argument("--context-tokens", type=int, default=154, help="text context length")
    p.add_argument("--use-checkpoint", choices=("config", "true", "false"), default="false",
                   help="U-Net use_checkpoint; default false as in the original PathLDM "
                        "config, so both implementations run the same architecture")
    p.add_argument("--optimizer", choices=("configured", "fused", "plain"),
                   default="configured",
                   help="ours: configure_optimizers() as is, or its AdamW rebuilt fused/plain")
    p.add_argument("--measure", default="train,sample,denoise",
                   help=f"comma-separated subset of {','.join(MEASURES)} (denoise needs "
                        "--reference-src to be useful)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat all measurements, ours and original interleaved")
    p.add_argument("--reference-src", type=Path,
                   help="checkout of the original code to compare against")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--flush-denormal", action="store_true",
                   help="flush denormal floats to zero on the CPU (torch.set_flush_denormal), "
                        "for both implementations alike")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="Markdown file to write/update with the table")
    p.add_argument("--label", help="section of --out to replace (default DEVICE-bBATCH-PRECISION)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _resolve(args: argparse.Namespace) -> None:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (48 if cuda else 2)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.steps = args.steps if args.steps is not None else (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    unknown = set(args.measure.split(",")) - set(MEASURES)
    if unknown:
        raise ValueError(f"--measure: unknown {sorted(unknown)}; choose from {MEASURES}")
    if args.reference_src is not None:
        unet = args.reference_src / "ldm" / "modules" / "diffusionmodules" / "openaimodel.py"
        if not unet.is_file():
            raise FileNotFoundError(f"--reference-src {args.reference_src}: no {unet}")
        args.reference_src = args.reference_src.resolve()
    if not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config} not found")


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    _resolve(args)
    spec = build_spec(args)
    spec.update(sample_runs=args.sample_runs, verbose=args.verbose)
    measures = [m for m in MEASURES if m in args.measure.split(",")]
    impls = ["ours"] + (["reference"] if args.reference_src else [])
    plan = [(i, m) for m in measures for i in impls
            if not (m == "sample" and i == "reference")
            and not (m == "denoise" and i == "ours" and not args.reference_src)]
    load_before = os.getloadavg()[0]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for r in range(args.rounds):
            for impl, m in (plan if r % 2 == 0 else plan[::-1]):
                res = run_worker(spec_path, impl, m)
                logger.info("%s %s ran the ldm package in %s", impl, m, res.pop("ldm_from"))
                prev = results.setdefault((impl, m), {**res, "times": []})
                prev["times"] += res["times"]
                prev["peak"] = max(prev["peak"], res["peak"])
                prev["baseline"] = min(prev["baseline"], res["baseline"])
    load = f"{load_before:.2f} / {os.getloadavg()[0]:.2f}"
    rows = result_rows(results, spec)
    print(format_table(["metric", "original (PathLDM)", "ours", "ours vs original"], rows))
    if args.out:
        notes = _notes(spec, results)
        command = " ".join(allocator_env(os.environ) + ["python scripts/benchmark.py"] + [
            a if a != str(args.reference_src) else "PATH/TO/PathLDM"
            for a in (sys.argv[1:] if argv is None else argv)])
        key = args.label or f"{spec['device']}-b{spec['batch']}-{spec['precision']}"
        update_markdown(args.out, key, markdown_section(
            key, rows, spec, command, machine_info(spec), load, notes))
        logger.info("wrote %s (section %s)", args.out, key)
    return results


def _notes(spec: dict, results: dict) -> list[str]:
    u = spec["unet"]
    notes = [f"U-Net: model_channels {u.get('model_channels')}, channel_mult "
             f"{u.get('channel_mult')}, attention_resolutions {u.get('attention_resolutions')}, "
             f"use_checkpoint {u.get('use_checkpoint', False)}; latents (B, "
             f"{', '.join(map(str, spec['latent']))}), context (B, "
             f"{', '.join(map(str, spec['context']))}); warm-up steps {spec['warmup']}"]
    if spec.get("flush_denormal"):
        notes.append("denormal floats flushed to zero on the CPU in both implementations "
                     "(`--flush-denormal`)")
    for (impl, m), r in sorted(results.items()):
        if r.get("note"):
            notes.append(f"{impl} {m}: {r['note']}")
    return notes


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        logging.getLogger("benchmark").error("%s: %s", type(e).__name__, e)
        sys.exit(1)
