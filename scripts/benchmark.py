#!/usr/bin/env python
"""Training-step and sampling speed and peak memory of the diffusion U-Net of a config.

The U-Net, schedule and optimizer settings come from the config (``ckpt_path`` stripped, random
weights); latents are random ``(B, C, H, W)`` tensors and the text context a random
``(B, 154, context_dim)`` tensor, so no autoencoder, text tower or data is needed. Measured:

  train    one training step as LatentDiffusion does it (noise the latents at random t, predict
           eps, MSE, backward, optimizer step, zero_grad), with the model's own forward and
           configure_optimizers; median seconds over --steps after --warmup steps.
  sample   DDIM (--ddim-steps, eta 0) with classifier-free guidance (--scale, cond and uncond
           batched as one forward) through the project's DDIMSampler.
  denoise  the same guided DDIM loop written out here around the bare denoiser call, so the
           original implementation (whose DDIMSampler needs CUDA) is timed identically.

Each measurement runs in a fresh subprocess. Memory: on CUDA the peak of
torch.cuda.max_memory_allocated; on CPU the peak resident set size (VmHWM) and its increase
over the same process right after setup (model, optimizer and inputs built).

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
import contextlib
import copy
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

# torch and ldm are imported inside functions: a reference worker must import `ldm` from
# --reference-src, never from this repository.
REPO = Path(__file__).resolve().parents[1]
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

    cfg = OmegaConf.load(args.config)
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
        "latent": [int(unet["in_channels"]), size, size],
        "context": [args.context_tokens, int(unet["context_dim"])],
        "reference_src": str(args.reference_src) if args.reference_src else None,
    }


# ---------------------------------------------------------------------------------- worker
def _peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux's ``VmHWM`` belongs to this process image; ``ru_maxrss`` survives ``exec`` and would
    report the (larger) parent's peak for a worker started from a big process such as pytest.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class _Probe:
    """Peak memory of this process: CUDA allocator peak, or the resident set size on CPU."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device

    def current(self) -> int:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            return self.torch.cuda.memory_allocated(self.device)
        return _peak_rss_bytes()

    def reset(self) -> int:
        """Start peak tracking here; returns the baseline."""
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats(self.device)
        return self.current()

    def peak(self) -> int:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated(self.device)
        return self.current()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def _autocast(spec: dict, device: Any):
    import torch

    if spec["precision"] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _inputs(spec: dict, device: Any) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(spec["seed"])
    b = spec["batch"]
    rand = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    return {"z": rand(b, *spec["latent"]), "c": rand(b, *spec["context"]),
            "uc": rand(b, *spec["context"]), "x_T": rand(b, *spec["latent"])}


def _ours(spec: dict, device: Any):
    """Our LatentDiffusion (frozen stages replaced by Identity) and its optimizer."""
    import torch

    from ldm.util import instantiate_from_config

    model = instantiate_from_config({"target": spec["target"], "params": spec["params"]})
    model = model.to(device)
    opt = model.configure_optimizers()
    if isinstance(opt, (list, tuple)):  # ([opt], [scheduler]) when a scheduler is configured
        opt = opt[0][0] if isinstance(opt[0], (list, tuple)) else opt[0]
    if spec["optimizer"] != "configured":
        keep = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
        groups = [{k: v for k, v in g.items() if k in keep + ("params",)}
                  for g in opt.param_groups]
        fused = spec["optimizer"] == "fused"
        opt = torch.optim.AdamW(groups, fused=fused, foreach=None if fused else False)
    return model, opt


class _Reference:
    """The original U-Net with the original LatentDiffusion's loss and denoiser call."""

    def __init__(self, spec: dict, device: Any) -> None:
        import inspect

        import numpy as np
        import torch

        from ldm.modules.diffusionmodules.openaimodel import UNetModel  # from reference_src

        accepted = inspect.signature(UNetModel.__init__).parameters
        dropped = sorted(k for k in spec["unet"] if k not in accepted)
        if dropped:
            logger.warning("reference UNetModel does not take %s; dropped", dropped)
        self.unet = UNetModel(**{k: v for k, v in spec["unet"].items() if k in accepted})
        self.unet = self.unet.to(device)
        p = spec["params"]
        betas = _linear_betas(p.get("linear_start", 1e-4), p.get("linear_end", 2e-2),
                              p.get("timesteps", 1000))
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        f32 = lambda a: torch.tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        self.sqrt_ac, self.sqrt_1m_ac = f32(np.sqrt(ac)), f32(np.sqrt(1.0 - ac))
        lvlb = f32(betas) ** 2 / (2 * f32(post_var) * f32(1.0 - betas) * (1 - f32(ac)))
        lvlb[0] = lvlb[1]
        self.lvlb_weights = lvlb
        self.logvar = torch.full((len(betas),), float(p.get("logvar_init", 0.0)), device=device)
        self.num_timesteps = len(betas)
        self.elbo_weight = float(p.get("original_elbo_weight", 0.0))
        self.simple_weight = float(p.get("l_simple_weight", 1.0))
        self.opt = torch.optim.AdamW(list(self.unet.parameters()), lr=spec["lr"])

    def apply_model(self, x, t, c):
        import torch

        with torch.cuda.amp.autocast():  # as the original apply_model: fp16 on CUDA
            return self.unet(x, t, context=torch.cat([c], 1))

    def backward_autocast(self, spec: dict, device: Any):
        """The autocast the original's backward has to run under.

        Its ``CheckpointFunction`` recomputes each transformer block in backward without
        restoring autocast, so a backward outside autocast feeds the half-precision block
        inputs saved in forward to float32 weights and fails. Backward under the forward's
        autocast (fp16 from ``apply_model`` on CUDA) recomputes in the forward's precision,
        as ours does and as later CompVis-derived code restores it.
        """
        import torch

        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return _autocast(spec, device)

    def loss(self, z, c):
        """The original LatentDiffusion.forward + p_losses (eps, l2) at random timesteps."""
        import torch
        import torch.nn.functional as F

        b = z.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), device=z.device).long()
        noise = torch.randn_like(z)
        view = (b, 1, 1, 1)
        x_noisy = (self.sqrt_ac.gather(-1, t).reshape(view) * z
                   + self.sqrt_1m_ac.gather(-1, t).reshape(view) * noise)
        out = self.apply_model(x_noisy, t, c)
        loss_simple = F.mse_loss(noise, out, reduction="none").mean([1, 2, 3])
        logvar_t = self.logvar[t]
        loss = self.simple_weight * (loss_simple / torch.exp(logvar_t) + logvar_t).mean()
        loss_vlb = F.mse_loss(noise, out, reduction="none").mean(dim=(1, 2, 3))
        return loss + self.elbo_weight * (self.lvlb_weights[t] * loss_vlb).mean()


def _linear_betas(start: float, end: float, n: int):
    import numpy as np

    return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2


def _train(spec: dict, impl: str, device: Any, probe: _Probe) -> dict[str, Any]:
    """Median-able step times of forward + loss + backward + optimizer step + zero_grad."""
    if impl == "ours":
        model, opt = _ours(spec, device)
        model.train()
        loss_fn = lambda z, c: model(z, c)[0]  # noqa: E731  (LatentDiffusion.forward)
        backward_ctx = contextlib.nullcontext  # non-reentrant checkpoint restores autocast
    else:
        ref = _Reference(spec, device)
        model, opt, loss_fn = ref.unet, ref.opt, ref.loss
        model.train()
        backward_ctx = functools.partial(ref.backward_autocast, spec, device)
    x = _inputs(spec, device)
    baseline = probe.reset()
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        probe.sync()
        start = time.perf_counter()
        with _autocast(spec, device):
            loss = loss_fn(x["z"], x["c"])
        with backward_ctx():
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.sync()
        times.append(time.perf_counter() - start)
        logger.info("%s train step %d/%d: %.3f s", impl, i + 1,
                    spec["warmup"] + spec["steps"], times[-1])
    fused = any(g.get("fused") for g in opt.param_groups)
    return {"times": times[spec["warmup"]:], "baseline": baseline, "peak": probe.peak(),
            "note": f"AdamW fused={fused}"}


def _guided_ddim(eps_fn, spec: dict, x, c, uc, alphas_cumprod) -> Any:
    """DDIM (eta 0) with guidance ``e_u + s (e_c - e_u)``, cond/uncond as one batch."""
    import numpy as np
    import torch

    n, steps = len(alphas_cumprod), spec["ddim_steps"]
    ts = np.asarray(list(range(0, n, n // steps))) + 1
    a = alphas_cumprod[ts]
    a_prev = np.asarray([alphas_cumprod[0]] + alphas_cumprod[ts[:-1]].tolist())
    cc = torch.cat([uc, c])
    for i in reversed(range(len(ts))):
        t = torch.full((x.shape[0],), int(ts[i]), device=x.device, dtype=torch.long)
        e_u, e_c = eps_fn(torch.cat([x] * 2), torch.cat([t] * 2), cc).chunk(2)
        e = (e_u + spec["scale"] * (e_c - e_u)).float()
        x0 = (x - float(np.sqrt(1 - a[i])) * e) / float(np.sqrt(a[i]))
        x = float(np.sqrt(a_prev[i])) * x0 + float(np.sqrt(1 - a_prev[i])) * e
    return x


def _sample(spec: dict, impl: str, measure: str, device: Any, probe: _Probe) -> dict[str, Any]:
    """Seconds for one full guided DDIM run after one warm-up denoiser call."""
    import numpy as np
    import torch

    if impl == "ours":
        model = _ours(spec, device)[0].eval()
        eps_fn = model.apply_model
    else:
        model = _Reference(spec, device)
        model.unet.eval()
        eps_fn = model.apply_model
    x = _inputs(spec, device)
    p = spec["params"]
    betas = _linear_betas(p.get("linear_start", 1e-4), p.get("linear_end", 2e-2),
                          p.get("timesteps", 1000))
    alphas_cumprod = np.cumprod(1.0 - betas)
    baseline = probe.reset()
    times = []
    with torch.no_grad(), _autocast(spec, device):
        b = spec["batch"]
        t = torch.full((2 * b,), 999, device=device, dtype=torch.long)
        eps_fn(torch.cat([x["x_T"]] * 2), t, torch.cat([x["uc"], x["c"]]))  # warm-up
        for _ in range(spec["sample_runs"]):
            probe.sync()
            start = time.perf_counter()
            if measure == "sample":
                from ldm.models.diffusion.ddim import DDIMSampler

                DDIMSampler(model).sample(
                    S=spec["ddim_steps"], batch_size=b, shape=spec["latent"],
                    conditioning=x["c"], eta=0.0, unconditional_guidance_scale=spec["scale"],
                    unconditional_conditioning=x["uc"], x_T=x["x_T"], verbose=False)
            else:
                _guided_ddim(eps_fn, spec, x["x_T"], x["c"], x["uc"], alphas_cumprod)
            probe.sync()
            times.append(time.perf_counter() - start)
            logger.info("%s %s: %.2f s", impl, measure, times[-1])
    return {"times": times, "baseline": baseline, "peak": probe.peak(), "note": ""}


def worker_main(argv: Sequence[str]) -> None:
    """Subprocess entry: ``_worker SPEC.json IMPL MEASURE RESULT.json``."""
    spec_path, impl, measure, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    _configure_logging(spec["verbose"])
    if impl == "reference":
        sys.path.insert(0, spec["reference_src"])
    else:
        sys.path.insert(0, str(REPO))
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.autocast.*")
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    probe = _Probe(device)
    if measure == "train":
        result = _train(spec, impl, device, probe)
    else:
        result = _sample(spec, impl, measure, device, probe)
    import ldm

    result["ldm_from"] = str(Path(ldm.__file__).resolve().parent)
    Path(result_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- orchestrator
def run_worker(spec_path: Path, impl: str, measure: str) -> dict[str, Any]:
    """One measurement in a fresh interpreter; raises with the worker's exit status."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", str(spec_path), impl,
           measure, str(result_path)]
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


def _ratio(ref: dict | None, ours: dict | None, key: str, device: str) -> str:
    if not ref or not ours:
        return "-"
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
        command = "python scripts/benchmark.py " + " ".join(
            a if a != str(args.reference_src) else "PATH/TO/PathLDM"
            for a in (sys.argv[1:] if argv is None else argv))
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
    for (impl, m), r in sorted(results.items()):
        if r.get("note"):
            notes.append(f"{impl} {m}: {r['note']}")
    return notes


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    else:
        try:
            main()
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
            logging.getLogger("benchmark").error("%s: %s", type(e).__name__, e)
            sys.exit(1)
