"""Merging YAML configs in order, with overlays that can replace or drop what lies below.

``OmegaConf.merge`` only adds and overrides keys. An overlay (e.g. ``configs/ablations/*.yaml``
on ``configs/pathldm.yaml``) sometimes has to remove some: a class embedder has no
``max_length``, a KL first stage no ``n_embed``. Two keys in an overlay's mapping say so:

- ``_replace_: true``: this mapping replaces the one below instead of merging into it;
- ``_drop_: [key, ...]``: these keys of the mapping below are removed before merging.

Both are consumed by the merge; the merged config (the one a run saves) never holds them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPLACE = "_replace_"
DROP = "_drop_"


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
