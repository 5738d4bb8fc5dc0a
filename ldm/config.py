"""Loading YAML configs: one file, or several merged in order with ``key=value`` overrides.

Every config a command reads (``main.py --base``, a checkpoint's run directory, the scripts'
``--config``) goes through :func:`read_yaml` / :func:`load_config`, so errors name the file the
same way everywhere.

``OmegaConf.merge`` only adds and overrides keys. An overlay (e.g. ``configs/ablations/*.yaml``
on ``configs/pathldm.yaml``) sometimes has to remove some: a class embedder has no
``max_length``, a KL first stage no ``n_embed``. Two keys in an overlay's mapping say so:

- ``_replace_: true``: this mapping replaces the one below instead of merging into it;
- ``_drop_: [key, ...]``: these keys of the mapping below are removed before merging.

Both are consumed by the merge; the merged config (the one a run saves) never holds them.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPLACE = "_replace_"
DROP = "_drop_"


class ConfigError(ValueError):
    """A user error in flags, configs or files; commands print it without a traceback."""


def read_json_object(path: str | Path, expected: str = "a JSON object") -> dict[str, Any]:
    """A JSON file that must hold an object; unreadable or other JSON is a one-line error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path, flag: str = "") -> DictConfig:
    """One YAML config; a one-line error naming the file (and ``flag``) if missing or invalid."""
    path = Path(path)
    where = f"{flag}: " if flag else ""
    if not path.is_file():
        raise ConfigError(f"{where}config file {path} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry the line number
        raise ConfigError(f"cannot parse config {path}: {' '.join(str(e).split())}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} is not a mapping of keys (got a list)")
    return cfg


def load_config(paths: Sequence[str | Path], overrides: Sequence[str] = (),
                flag: str = "") -> DictConfig:
    """YAML files merged in order (:func:`merge_configs`), then ``key=value`` overrides."""
    if not paths:
        raise ConfigError("no config given" + (f": pass {flag} CONFIG.yaml (several are merged "
                                               "in order)" if flag else ""))
    configs = [read_yaml(p, flag) for p in paths]
    bad = [d for d in overrides if "=" not in d or d.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognized arguments {bad}: overrides are written key=value, e.g. "
                          "data.params.batch_size=8")
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from e
    try:
        return merge_configs(*configs, cli)
    except ValueError as e:
        raise ConfigError(f"cannot merge {', '.join(map(str, paths))}: {e}") from e


def _apply_directives(base: dict, overlay: dict, where: str) -> None:
    """Remove from ``base`` what ``overlay`` replaces or drops, and the directives themselves."""
    for key, value in overlay.items():
        if not isinstance(value, dict):
            continue
        path = f"{where}{key}"
        replace = value.pop(REPLACE, False)
        drop = value.pop(DROP, [])
        if not isinstance(replace, bool):
            raise ValueError(f"{path}.{REPLACE} must be true or false, got {replace!r}")
        if not isinstance(drop, list) or not all(isinstance(k, str) for k in drop):
            raise ValueError(f"{path}.{DROP} must be a list of key names, got {drop!r}")
        below = base.get(key)
        if replace:
            base.pop(key, None)
            below = None
        for name in drop:
            if not isinstance(below, dict) or name not in below:
                raise ValueError(f"{path}.{DROP}: '{name}' is not a key of {path} in the "
                                 "configs before this one")
            del below[name]
        _apply_directives(below if isinstance(below, dict) else {}, value, f"{path}.")


def merge_configs(*configs: DictConfig | Mapping[str, Any]) -> DictConfig:
    """``OmegaConf.merge`` of ``configs`` in order, honouring ``_replace_`` and ``_drop_``."""
    merged: dict = {}
    for cfg in configs:
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(dict(cfg))
        overlay = OmegaConf.to_container(cfg, resolve=False)
        _apply_directives(merged, overlay, "")
        merged = OmegaConf.to_container(OmegaConf.merge(merged, overlay), resolve=False)
    return OmegaConf.create(merged)
