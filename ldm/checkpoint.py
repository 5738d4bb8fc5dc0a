"""Load trained models from a checkpoint, a run directory or an explicit config.

A checkpoint written by ``main.py`` embeds its resolved config under ``checkpoint["config"]``;
a run directory ``logs/<run>/`` has ``checkpoints/last.ckpt`` and ``configs/*-project.yaml``;
released CompVis/PathLDM checkpoints need an explicit config.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.util import instantiate_from_config, load_checkpoint_into

logger = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "raw")
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("decay", "num_updates")
# The legacy keys, listed once for every loader: what checkpoints of the original carry and our
# models lack by design. PathLDM's track_fid built an Inception inside the model; transformers
# < 4.31 saved the text tower's position ids.
LEGACY_PREFIXES = ("inception.",)
LEGACY_SUFFIXES = ("embeddings.position_ids",)
# numpy dtypes whose classes a weights-only load may meet (callback and loop states)
NUMPY_DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")
TRUST_FLAG = "--trust-checkpoint"
_trusted = False  # set by set_trust(); full-pickle loads only when True

ConfigSource = str | Path | Mapping | Sequence[str | Path] | None


@dataclass
class LoadedCheckpoint:
    """A loaded model with where it came from and which weights it carries."""

    model: torch.nn.Module
    checkpoint_path: Path
    config: dict[str, Any]
    weights: str
    global_step: int | None = None
    ignored_keys: list[str] = field(default_factory=list)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded (safely); the message is one line naming it."""


class LegacyCallbackKey:
    """Stands in for the Lightning 1.x callback classes pickled as keys of ``ckpt["callbacks"]``.

    CompVis/PathLDM checkpoints were saved by Lightning 1.x, which keyed callback states by the
    callback's class; a weights-only load resolves each class name to an inert subclass.
    """

    legacy_name = ""


def _legacy_callback_keys() -> list[type]:
    """One inert :class:`LegacyCallbackKey` subclass per Lightning callback class name."""
    return [type(cls, (LegacyCallbackKey,), {"legacy_name": f"{pkg}.callbacks.{mod}.{cls}"})
            for pkg in ("pytorch_lightning", "lightning.pytorch")
            for mod, cls in (("model_checkpoint", "ModelCheckpoint"),
                             ("early_stopping", "EarlyStopping"),
                             ("lr_monitor", "LearningRateMonitor"))]


_LEGACY_CALLBACK_KEYS = _legacy_callback_keys()


def _allowed_globals() -> list[Any]:
    """Globals a weights-only load accepts beyond torch's own: data-only numpy reconstructors
    and the Lightning 1.x callback classes (as inert markers). Nothing here runs user code."""
    import numpy as np

    marker = [(cls, cls.legacy_name) for cls in _LEGACY_CALLBACK_KEYS]
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    numpy = [(core.scalar, f"{m}.multiarray.scalar") for m in ("numpy.core", "numpy._core")]
    numpy += [(core._reconstruct, f"{m}.multiarray._reconstruct")
              for m in ("numpy.core", "numpy._core")]
    numpy += [np.dtype, np.ndarray] + [type(np.dtype(t)) for t in NUMPY_DTYPES]
    return marker + numpy



def set_trust(enabled: bool) -> None:
    """Allow full-pickle loads for this process (``--trust-checkpoint``); default: refused."""
    global _trusted
    _trusted = bool(enabled)
    if enabled:
        logger.warning("%s: checkpoints load as full pickles, which can run arbitrary code; "
                       "use it only for files you trust", TRUST_FLAG)


def safe_globals() -> Any:
    """Context manager that lets ``torch.load(weights_only=True)`` accept the allow-list."""
    return torch.serialization.safe_globals(_allowed_globals())


def _one_line(e: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message, on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def load_torch_file(path: str | Path, trust: bool | None = None, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file: weights-only with the allow-list, never silently more.

    A full pickle happens only when ``trust`` (or :func:`set_trust`) says so. Missing, empty,
    truncated, corrupt and refused files raise one-line errors naming the file.
    """
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    trusted = _trusted if trust is None else trust
    use_mmap = mmap and zipfile.is_zipfile(path)  # the legacy (pre-zip) format cannot be mapped
    try:
        with safe_globals():
            return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not trusted and refused:
            raise CheckpointError(
                f"{path}: refused to load: it pickles {', '.join(refused)}, which a weights-only "
                f"load does not allow (unpickling it could run code); pass {TRUST_FLAG} only if "
                "you trust where the file came from") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({size} bytes; corrupt or "
                              f"another format): {_one_line(e)}") from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, AttributeError, TypeError,
            ImportError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({size} bytes; truncated, "
                              f"corrupt or another format): {type(e).__name__}: "
                              f"{_one_line(e)}") from None


def read_checkpoint(path: str | Path, trust: bool | None = None,
                    mmap: bool = False) -> dict[str, Any]:
    """The whole checkpoint dict (``state_dict``, ``config``, ...) of a ``.ckpt``/``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = load_torch_file(path, trust=trust, mmap=mmap)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    obj = dict(obj)
    if "state_dict" not in obj:  # a bare state_dict
        obj = {"state_dict": obj}
    if not isinstance(obj["state_dict"], Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(obj['state_dict']).__name__}, "
                              "not a mapping of tensors")
    return obj


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors export as a checkpoint dict; its ``config`` metadata (JSON) is restored."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        ckpt: dict[str, Any] = {"state_dict": load_file(str(path))}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({Path(path).stat().st_size} bytes; truncated or corrupt?): "
                              f"{_one_line(e)}") from None
    if metadata.get("config"):
        ckpt["config"] = json.loads(metadata["config"])
    if metadata.get("global_step"):
        ckpt["global_step"] = int(metadata["global_step"])
    return ckpt


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                      config: Mapping | None = None, **metadata: Any) -> None:
    """Save tensors (contiguous copies, no shared storage) with the config as JSON metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: str(v) for k, v in metadata.items() if v is not None}
    if config is not None:
        meta["config"] = json.dumps(config)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def resolve_checkpoint(path_or_rundir: str | Path) -> Path:
    """The checkpoint file of a path: itself, or ``checkpoints/last.ckpt`` of a run directory."""
    path = Path(path_or_rundir)
    if path.is_file():
        return path
    if path.is_dir():
        ckpt_dir = path / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        if last.is_file():
            return last
        ckpts = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if ckpts:
            logger.info("%s has no last.ckpt; using the newest checkpoint %s", path, ckpts[-1])
            return ckpts[-1]
        raise FileNotFoundError(f"run directory {path} has no checkpoints/*.ckpt")
    raise FileNotFoundError(f"checkpoint or run directory not found: {path}")


def run_dir_configs(ckpt_path: Path) -> list[Path]:
    """``configs/*-project.yaml`` of the run a checkpoint belongs to (oldest first)."""
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return sorted((run / "configs").glob("*-project.yaml"))


def load_config(source: ConfigSource) -> dict[str, Any]:
    """A config as plain data from a mapping, a YAML file or several merged in order."""
    from omegaconf import OmegaConf

    if isinstance(source, Mapping):
        return OmegaConf.to_container(OmegaConf.create(dict(source)), resolve=True)
    from ldm.config import load_config as load_yaml_configs

    paths = [source] if isinstance(source, (str, Path)) else list(source or [])
    return OmegaConf.to_container(load_yaml_configs(paths), resolve=True)


def model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section of a full config (or the config itself if it has a ``target``)."""
    if "model" in config and isinstance(config["model"], Mapping):
        return dict(config["model"])
    if "target" in config:
        return dict(config)
    raise KeyError(f"config has neither a 'model' section nor a 'target' (keys: {list(config)})")


def strip_init_checkpoints(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of a model config without ``ckpt_path`` entries: the full checkpoint replaces them."""
    cfg = copy.deepcopy(dict(cfg))

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("ckpt_path"):
                logger.info("not loading %s.ckpt_path=%s (weights come from the checkpoint)",
                            where, node["ckpt_path"])
            node.pop("ckpt_path", None)
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(cfg, "model")
    return cfg


def split_ema(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(weights without model_ema.*, EMA shadow params keyed by dot-less name)``."""
    main = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)
           and k[len(EMA_PREFIX):] not in EMA_BOOKKEEPING}
    return main, ema


def ema_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict with the EMA weights in place of ``model.*`` and no ``model_ema.*`` keys.

    LitEma names a shadow param ``model_ema.<name without dots>`` after the parameter of
    ``model`` (the DiffusionWrapper) it tracks; params it does not track stay as they are.
    """
    main, ema = split_ema(state_dict)
    if not ema:
        raise KeyError("no EMA weights (no model_ema.* keys)")
    out = dict(main)
    used = set()
    for key in main:
        if not key.startswith("model."):
            continue
        short = key[len("model."):].replace(".", "")
        if short in ema:
            out[key] = ema[short].to(main[key].dtype)
            used.add(short)
    if not used:
        raise KeyError("model_ema.* keys do not match any model.* parameter")
    unused = sorted(set(ema) - used)
    if unused:
        logger.warning("%d EMA entries match no model.* parameter (first: %s)", len(unused),
                       unused[:5])
    logger.info("using EMA weights for %d of %d model.* tensors", len(used),
                sum(k.startswith("model.") for k in main))
    return out


def legacy_keys(state_dict: Mapping[str, Any], own: Mapping[str, Any] | None = None) -> list[str]:
    """Legacy keys of ``state_dict`` (see ``LEGACY_PREFIXES``), those ``own`` lacks if given."""
    return [k for k in state_dict if (own is None or k not in own)
            and (k.startswith(LEGACY_PREFIXES) or k.endswith(LEGACY_SUFFIXES))]


def legacy_group(key: str) -> str:
    """How a legacy key is reported: its top module for a prefix (``inception``), else itself."""
    return key.split(".")[0] if key.startswith(LEGACY_PREFIXES) else key


def find_config(ckpt: Mapping[str, Any], ckpt_path: Path, config: ConfigSource) -> dict:
    """The explicit config, else the checkpoint's embedded one, else its run directory's."""
    if config is not None:
        return load_config(config)
    if isinstance(ckpt.get("config"), Mapping):
        return load_config(ckpt["config"])
    found = run_dir_configs(ckpt_path)
    if found:
        logger.info("config from %s", found[-1])
        return load_config(found[-1])
    raise ValueError(f"{ckpt_path} has no embedded config and no run-directory "
                     "configs/*-project.yaml; pass a config (--config model.yaml)")


def load_model(path_or_rundir: str | Path, config: ConfigSource = None, weights: str = "auto",
               map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Instantiate the model of a checkpoint/run directory and load its weights (eval mode).

    ``weights``: ``"ema"`` requires EMA weights, ``"raw"`` ignores them, ``"auto"`` uses them
    when present. Keys of PathLDM's in-model Inception and stale ``position_ids`` are reported
    and ignored; any other mismatch raises.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    ckpt_path = resolve_checkpoint(path_or_rundir)
    ckpt = read_checkpoint(ckpt_path)
    cfg = find_config(ckpt, ckpt_path, config)
    model = instantiate_from_config(strip_init_checkpoints(model_config(cfg)))
    sd = dict(ckpt["state_dict"])
    has_ema = any(k.startswith(EMA_PREFIX) for k in sd)
    if weights == "ema" and not has_ema:
        raise KeyError(f"{ckpt_path} has no EMA weights (no model_ema.* keys); "
                       "use --weights raw (or auto)")
    use_ema = has_ema and weights != "raw"
    own = model.state_dict()
    if use_ema:
        sd = {**sd, **{k: v for k, v in ema_state_dict(sd).items() if k.startswith("model.")}}
    ignored = legacy_keys(sd, own)
    if ignored:
        groups = sorted({legacy_group(k) for k in ignored})
        logger.info("ignoring %d checkpoint keys the model does not use: %s", len(ignored), groups)
    ema_keys = [k for k in sd if k.startswith(EMA_PREFIX) and k not in own]
    missing_ema_only = all(k.startswith(EMA_PREFIX) for k in own if k not in sd)
    load_checkpoint_into(model, sd, ignore_keys=ignored + ema_keys,
                         allow_missing=missing_ema_only, name=type(model).__name__)
    if not use_ema and getattr(model, "use_ema", False):
        # model.model holds the raw weights; keep ema_scope() from swapping in other weights
        # (model_ema is either absent from the checkpoint or not wanted).
        model.use_ema = False
    model.eval().to(map_location)
    used = "ema" if use_ema else "raw"
    logger.info("loaded %s (%s weights, global step %s)", ckpt_path, used, ckpt.get("global_step"))
    return LoadedCheckpoint(model=model, checkpoint_path=ckpt_path, config=cfg, weights=used,
                            global_step=ckpt.get("global_step"), ignored_keys=ignored)


def load_model_from_checkpoint(path_or_rundir: str | Path, config: ConfigSource = None,
                               weights: str = "auto",
                               map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of a checkpoint or run directory, in eval mode (see :func:`load_model`)."""
    return load_model(path_or_rundir, config=config, weights=weights,
                      map_location=map_location).model
