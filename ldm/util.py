"""Small helpers shared across the package: config instantiation and checkpoint loading."""
from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def exists(x: Any) -> bool:
    """True when ``x`` is not None."""
    return x is not None


def default(val: Any, d: Any) -> Any:
    """``val`` unless it is None, else ``d`` (called if callable)."""
    if exists(val):
        return val
    return d() if callable(d) else d


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    module_name, _, cls_name = string.rpartition(".")
    if not module_name:
        raise ValueError(f"target {string!r} is not a dotted path like 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} for target {string!r}: {e}") from e
    try:
        return getattr(module, cls_name)
    except AttributeError as e:
        raise ImportError(f"module {module_name!r} has no attribute {cls_name!r} "
                          f"(target {string!r})") from e


def instantiate_from_config(config: Mapping | None, **extra: Any) -> Any:
    """Build ``config.target(**config.params, **extra)``; the CompVis config contract.

    The special strings ``__is_first_stage__`` and ``__is_unconditional__`` yield None, as in
    CompVis latent-diffusion.
    """
    if config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if config is None or "target" not in config:
        raise KeyError(f"expected a mapping with a 'target' key, got {config!r}")
    params = config.get("params", None) or {}
    if hasattr(params, "items") and not isinstance(params, dict):
        from omegaconf import OmegaConf  # OmegaConf node -> plain containers

        params = OmegaConf.to_container(params, resolve=True)
    return get_obj_from_str(config["target"])(**params, **extra)


@dataclass
class LoadReport:
    """What :func:`load_checkpoint_into` did."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One-line description for logs."""
        return (f"loaded {len(self.loaded)} keys, missing {len(self.missing)}, "
                f"unexpected {len(self.unexpected)}, ignored {len(self.ignored)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a ``.ckpt``/``.pt``/``.pth`` or ``.safetensors`` file.

    Loading is :func:`ldm.checkpoint.read_checkpoint`'s (weights-only with an allow-list; a full
    pickle only with ``--trust-checkpoint``), imported here because that module builds on this one.
    """
    from ldm.checkpoint import read_checkpoint

    return dict(read_checkpoint(path)["state_dict"])


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in patterns)


def load_checkpoint_into(
    model: torch.nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    prefix: str | None = None,
    ignore_keys: Iterable[str] = (),
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    name: str = "model",
) -> LoadReport:
    """Load weights into ``model`` and fail loudly on mismatches.

    ``prefix`` (e.g. ``"model.diffusion_model."``) is stripped when present: keys with it are
    kept without it and, if any key had it, keys without it are reported as ignored, so a full
    LDM checkpoint and a bare one both load. Keys starting with any of ``ignore_keys`` are
    dropped. Missing/unexpected keys raise unless allowed; the count of loaded keys is logged.
    """
    label = str(source) if isinstance(source, (str, Path)) else "<state_dict>"
    sd = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    report = LoadReport()
    if prefix and any(k.startswith(prefix) for k in sd):
        report.ignored += [k for k in sd if not k.startswith(prefix)]
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    ignore_keys = tuple(ignore_keys)
    if ignore_keys:
        report.ignored += [k for k in sd if _matches(k, ignore_keys)]
        sd = {k: v for k, v in sd.items() if not _matches(k, ignore_keys)}
    own = model.state_dict()
    report.missing = [k for k in own if k not in sd]
    report.unexpected = [k for k in sd if k not in own]
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    if bad_shape:
        problems.append("shape mismatches:\n  " + "\n  ".join(bad_shape))
    if report.missing and not allow_missing:
        problems.append(f"{len(report.missing)} missing keys:\n  " + "\n  ".join(report.missing))
    if report.unexpected and not allow_unexpected:
        problems.append(f"{len(report.unexpected)} unexpected keys:\n  "
                        + "\n  ".join(report.unexpected))
    if problems:
        raise RuntimeError(f"cannot load {label} into {name}: " + "\n".join(problems)
                           + "\n(pass ignore_keys, or allow_missing/allow_unexpected, if intended)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    report.loaded = [k for k in sd if k in own]
    logger.info("%s <- %s: %s", name, label, report.summary())
    for kind in ("missing", "unexpected", "ignored"):
        keys = getattr(report, kind)
        if keys:
            logger.info("  %s keys (first 10): %s", kind, keys[:10])
    return report
