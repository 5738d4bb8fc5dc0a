"""Check a merged training config against main.py's sections and the constructors it names.

Runs before anything is built: unknown keys (with the closest valid name), values of the wrong
type, unresolvable interpolations and empty or non-training data stores each give one line that
names the key and the file (or the command line) it came from. Constructors that take
``**kwargs`` are followed to the class they pass them on to; a chain that ends outside this
package accepts any key.
"""
from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.config import read_yaml

# Keys main.py reads in each top-level section (``lightning.run`` records earlier sessions).
SECTIONS = {
    "model": ("target", "params", "base_learning_rate", "scale_lr"),
    "data": ("target", "params"),
    "lightning": ("trainer", "modelcheckpoint", "callbacks", "loggers", "run"),
}
NODE_KEYS = ("target", "params")
SPECIAL_NODES = ("__is_first_stage__", "__is_unconditional__")
# lightning.trainer keys that main.py resolves itself (with its own messages)
TRAINER_OWN = ("gpus",)


class _Context:
    """Where keys come from: the command line or the last config file that sets them."""

    def __init__(self, files: Sequence[str | Path], overrides: Sequence[str]) -> None:
        self.files = [(str(f), read_yaml(f)) for f in files]
        self.cli = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        self.problems: list[str] = []

    def origin(self, key: str) -> str:
        """``command line``, the last file that sets ``key``, or ``merged config``."""
        if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in self.cli):
            return "command line"
        for name, cfg in reversed(self.files):
            try:
                if OmegaConf.select(cfg, key, default=None, throw_on_missing=False) is not None:
                    return name
            except Exception:  # an interpolation in that file: it still sets the key
                return name
        return "merged config"

    def add(self, key: str, message: str) -> None:
        """Record one problem line for ``key``."""
        self.problems.append(f"{key} ({self.origin(key)}): {message}")


def _closest(name: str, valid: Sequence[str]) -> str:
    """``; did you mean 'x'?`` (difflib), else the valid names."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    shown = ", ".join(sorted(valid)[:12]) + (", ..." if len(valid) > 12 else "")
    return f" (valid: {shown})"


def _unknown(ctx: _Context, key: str, owner: str, name: str, valid: Sequence[str]) -> None:
    ctx.add(key, f"{owner} has no '{name}'{_closest(name, valid)}")


# ----------------------------------------------------------------------------- signatures
def _init_params(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword parameters of ``cls(...)`` along its ``**kwargs`` chain; True if it stays open."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        if not klass.__module__.startswith("ldm."):
            # pytorch/lightning base classes: a chain that reaches them with **kwargs is open
            own = inspect.signature(klass.__init__).parameters
            open_chain = any(p.kind is p.VAR_KEYWORD for p in own.values())
            params.update({n: p for n, p in own.items() if n != "self"
                           and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)})
            return params, open_chain
        sig = inspect.signature(klass.__init__)
        for n, p in sig.parameters.items():
            if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(n, p)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, False
    return params, True


def _callable_params(obj: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    if isinstance(obj, type):
        return _init_params(obj)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return {}, True
    open_chain = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return {n: p for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}, open_chain


# ----------------------------------------------------------------------------- types
_BASIC = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "Path": "a string", "None": "null", "Mapping": "a mapping", "dict": "a mapping",
          "Sequence": "a list", "list": "a list", "tuple": "a list", "Iterable": "a list"}


def _split_union(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _kinds(param: inspect.Parameter) -> list[str] | None:
    """Basic kinds an argument may take (from the annotation, else the default); None: any."""
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        default = param.default
        if isinstance(default, (bool, int, float, str)):
            return [type(default).__name__]
        return None
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    m = re.fullmatch(r"Optional\[(.*)\]", text)
    if m:
        text = f"{m.group(1)} | None"
    kinds = [p.split("[")[0].split(".")[-1] for p in _split_union(text)]
    return kinds if all(k in _BASIC for k in kinds) else None


def _fits(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("str", "Path"):
        return isinstance(value, str)
    if kind == "None":
        return value is None
    if kind in ("Mapping", "dict"):
        return isinstance(value, Mapping)
    return isinstance(value, (list, tuple))  # Sequence, list, tuple, Iterable


def _check_type(ctx: _Context, key: str, owner: str, param: inspect.Parameter,
                value: Any) -> None:
    kinds = _kinds(param)
    if kinds is None or any(_fits(value, k) for k in kinds):
        return
    want = " or ".join(dict.fromkeys(_BASIC[k] for k in kinds))
    ctx.add(key, f"{value!r} is not {want} ({owner} takes {param.name}: "
                 f"{param.annotation if isinstance(param.annotation, str) else kinds[0]})")


# ----------------------------------------------------------------------------- nodes
def _check_params(ctx: _Context, key: str, owner: str, fn: Any, params: Mapping) -> None:
    accepted, open_chain = _callable_params(fn)
    schema = getattr(fn, "config_schema", {})
    for name, value in params.items():
        sub = f"{key}.{name}"
        if name not in accepted:
            if not open_chain:
                _unknown(ctx, sub, owner, name, list(accepted))
            continue
        if isinstance(value, Mapping) and "target" in value:
            check_node(ctx, sub, value)
        elif isinstance(value, Mapping) and name in schema:
            target = schema[name]
            _check_params(ctx, sub, target.__name__, target, value)
        else:
            _check_type(ctx, sub, owner, accepted[name], value)


def check_node(ctx: _Context, key: str, node: Any, extra: Sequence[str] = ()) -> None:
    """A ``{target, params}`` node: importable target, known keys, parameters and types."""
    from ldm.util import get_obj_from_str

    if node is None or node in SPECIAL_NODES:
        return
    if not isinstance(node, Mapping) or "target" not in node:
        ctx.add(key, "expected a mapping with 'target' (and 'params')")
        return
    for name in node:
        if name not in (*NODE_KEYS, *extra):
            _unknown(ctx, f"{key}.{name}", key, name, [*NODE_KEYS, *extra])
    try:
        fn = get_obj_from_str(str(node["target"]))
    except (ImportError, ValueError) as e:
        ctx.add(f"{key}.target", " ".join(str(e).split()))
        return
    params = node.get("params") or {}
    if not isinstance(params, Mapping):
        ctx.add(f"{key}.params", f"expected a mapping of parameters, got {params!r}")
        return
    _check_params(ctx, f"{key}.params", getattr(fn, "__name__", str(node["target"])), fn, params)


def _check_lightning(ctx: _Context, cfg: Mapping) -> None:
    import pytorch_lightning as pl

    trainer = cfg.get("trainer") or {}
    accepted, _ = _init_params(pl.Trainer)
    for name, value in trainer.items():
        if name not in accepted and name not in TRAINER_OWN:
            _unknown(ctx, f"lightning.trainer.{name}", "pl.Trainer", name, list(accepted))
        elif name in accepted:
            _check_type(ctx, f"lightning.trainer.{name}", "pl.Trainer", accepted[name], value)
    ckpt = cfg.get("modelcheckpoint") or {}
    for name in ckpt:
        if name not in ("params", "target"):
            _unknown(ctx, f"lightning.modelcheckpoint.{name}", "lightning.modelcheckpoint", name,
                     ["params"])
    from pytorch_lightning.callbacks import ModelCheckpoint

    _check_params(ctx, "lightning.modelcheckpoint.params", "ModelCheckpoint", ModelCheckpoint,
                  ckpt.get("params") or {})
    for group in ("callbacks", "loggers"):
        for name, node in (cfg.get(group) or {}).items():
            check_node(ctx, f"lightning.{group}.{name}", node)


def _check_stores(ctx: _Context, data: Mapping) -> None:
    from ldm.data.store import store_problem

    params = data.get("params") or {}
    for split in ("train", "validation", "test"):
        cfg = params.get(split)
        path = cfg.get("path") if isinstance(cfg, Mapping) and "target" not in cfg else None
        if isinstance(path, str) and Path(path).is_file():  # a missing one: path_problems
            problem = store_problem(path, split)
            if problem:
                ctx.add(f"data.params.{split}.path", problem)


def config_problems(config: DictConfig, files: Sequence[str | Path],
                    overrides: Sequence[str]) -> list[str]:
    """One line per problem of the merged ``config`` (empty when it can be built)."""
    ctx = _Context(files, overrides)
    try:
        plain = OmegaConf.to_container(config, resolve=True)
    except Exception as e:  # interpolation errors name the key in their text
        return [f"cannot resolve the config: {' '.join(str(e).split())}"]
    for name in plain:
        if name not in SECTIONS:
            _unknown(ctx, name, "the config", name, list(SECTIONS))
    for section in ("model", "data"):
        check_node(ctx, section, plain.get(section), extra=SECTIONS[section][2:])
    model = plain.get("model") or {}
    lr = model.get("base_learning_rate", 1.0)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        ctx.add("model.base_learning_rate", f"{lr!r} is not a positive number")
    if not isinstance(model.get("scale_lr", False), bool):
        ctx.add("model.scale_lr", f"{model['scale_lr']!r} is not true or false")
    lightning = plain.get("lightning") or {}
    for name in lightning:
        if name not in SECTIONS["lightning"]:
            _unknown(ctx, f"lightning.{name}", "lightning", name, SECTIONS["lightning"])
    _check_lightning(ctx, lightning)
    if isinstance(plain.get("data"), Mapping) and not ctx.problems:
        _check_stores(ctx, plain["data"])
    return ctx.problems
