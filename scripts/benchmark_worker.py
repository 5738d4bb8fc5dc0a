#!/usr/bin/env python
"""One measurement of scripts/benchmark.py, run in a fresh interpreter.

``python scripts/benchmark_worker.py SPEC.json IMPL MEASURE RESULT.json`` builds ``ours`` (this
repository's LatentDiffusion) or ``reference`` (the original U-Net from the spec's
``reference_src``), runs MEASURE (train, sample or denoise) and writes times, memory and, for
train, the counted convolution and matrix-multiply FLOPs of one step as JSON. It imports ``ldm``
only after putting the chosen source first on sys.path, so the original's package is never
shadowed by ours.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmark")
# Convolution and linear-layer work, which the same architecture fixes up to gradients one
# implementation computes and the other skips; attention (the original's einsum/bmm, our SDPA
# kernels) is left out because its cost depends on the kernel, not the architecture.
DENSE_OPS = frozenset({"convolution", "convolution_backward", "mm", "addmm"})


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of Linux's /proc/self/status (``VmRSS``, ``VmHWM``), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (since the last :func:`_reset_peak_rss`).

    Linux's ``VmHWM`` belongs to this process image; ``ru_maxrss`` survives ``exec`` and would
    report the (larger) parent's peak for a worker started from a big process such as pytest.
    """
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kib * 1024


def _reset_peak_rss() -> bool:
    """Set ``VmHWM`` back to the current resident size (Linux); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Probe:
    """Peak memory of this process: CUDA allocator peak, or the resident set size on CPU."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device

    def reset(self) -> int:
        """Start peak tracking here; returns the memory in use now, the baseline.

        On CPU the resident peak is reset to the current size, so that a transient peak while
        building the model is not taken for the baseline; where it cannot be reset (not Linux),
        the baseline is the peak so far.
        """
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            return self.torch.cuda.memory_allocated(self.device)
        rss = _status_kib("VmRSS")
        if _reset_peak_rss() and rss is not None:
            return rss * 1024
        logger.warning("cannot reset the peak resident size here; the baseline is the peak "
                       "resident size after setup")
        return _peak_rss_bytes()

    def peak(self) -> int:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated(self.device)
        return _peak_rss_bytes()

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
    # A configured LambdaLR has already scaled each group's rate by its warm-up factor at step
    # 0 (1e-6 for PathLDM). The scheduler is never stepped here, so train at the configured
    # rate, as the original's AdamW(params, lr=lr) does: near-zero updates would leave the
    # zero-initialised layers near zero and fill AdamW's state with slow denormal numbers.
    for group in opt.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
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

    def step() -> None:
        with _autocast(spec, device):
            loss = loss_fn(x["z"], x["c"])
        with backward_ctx():
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    baseline = probe.reset()
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        probe.sync()
        start = time.perf_counter()
        step()
        probe.sync()
        times.append(time.perf_counter() - start)
        logger.info("%s train step %d/%d: %.3f s", impl, i + 1,
                    spec["warmup"] + spec["steps"], times[-1])
    peak = probe.peak()
    try:  # one more step, after the measurements: counting costs time and memory
        flops = dense_flops(step)
    except RuntimeError as e:  # the counter's module hooks reject some reentrant autograd.grad
        logger.warning("%s: FLOPs not counted: %s", impl, e)
        flops = None
    return {"times": times[spec["warmup"]:], "baseline": baseline, "peak": peak,
            "flops": flops, **_optimizer_report(opt, spec)}


def _optimizer_report(opt: Any, spec: dict) -> dict[str, Any]:
    """The optimizer's rates and the denormal count of its state, with a one-line note."""
    fused = any(g.get("fused") for g in opt.param_groups)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    note = f"AdamW fused={fused}, lr {', '.join(f'{lr:g}' for lr in lrs)}"
    denormals = None  # flushed denormals also read as zero, so there is nothing to count
    if not spec.get("flush_denormal"):
        denormals = denormal_count(
            [t for s in opt.state.values() for t in s.values() if t.is_floating_point()])
        note += f", {denormals / 1e6:.2f} M denormal values in its state after the timed steps"
    return {"denormals": denormals, "lr": lrs, "note": note}


def denormal_count(tensors: Sequence[Any]) -> int:
    """Nonzero values below their dtype's smallest normal number, summed over ``tensors``.

    When near-zero updates keep zero-initialised layers near zero (from random weights at a
    tiny rate), AdamW's second moments of the gradients behind them underflow into this range;
    arithmetic on such values is much slower on many CPUs unless they are flushed to zero.
    """
    import torch

    return sum(int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum()) for t in tensors)


def denormals_flushed() -> bool:
    """Whether this process's CPU arithmetic flushes denormal results to zero."""
    import torch

    tiny = torch.finfo(torch.float32).tiny
    return bool((torch.tensor([tiny]) / 4).eq(0).all())


def dense_flops(fn: Callable[[], Any]) -> int:
    """Convolution and matrix-multiply FLOPs (``DENSE_OPS``) that one call of ``fn`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    return int(sum(n for op, n in counts.items() if str(op).split(".")[-1] in DENSE_OPS))


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


def main(argv: Sequence[str]) -> None:
    """Run one measurement: ``SPEC.json IMPL MEASURE RESULT.json``."""
    spec_path, impl, measure, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    logging.basicConfig(level=logging.DEBUG if spec["verbose"] else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    sys.path.insert(0, spec["reference_src"] if impl == "reference" else str(REPO))
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.autocast.*")
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec.get("flush_denormal") and not torch.set_flush_denormal(True):
        raise RuntimeError("--flush-denormal: this CPU cannot flush denormal numbers to zero")
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
    result["denormals_flushed"] = denormals_flushed()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
