"""The recorded evaluation protocol and the saved feature files that carry it.

A feature file ``features_<extractor>.npz`` holds ``features`` (N, D), ``names`` (N,),
optionally ``text_features`` and ``captions`` (CLIP-like extractors), ``levels`` (N, 2) and a
``meta`` JSON string: the extractor's provenance (spec, weight hash, preprocessing), the image
protocol (centre crop, resize, n, seed), the image set (path, kind, content hash, formats).
Comparing features whose protocol differs is an error (:func:`check_protocol`). ``fid.py``'s
reference statistics carry the same record in a sidecar ``<name>.protocol.json``.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ldm.config import read_json_object

# what must agree between a reference feature file and the requested evaluation
PROTOCOL_KEYS = ("extractor", "weights_sha256", "center_crop", "resize")
PACKAGES = ("pathldm", "torch", "torchvision", "numpy", "scipy", "transformers", "timm",
            "open_clip_torch", "pytorch-fid")


class ProtocolMismatch(ValueError):
    """Saved features were made under another protocol than the one requested."""


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape the numbers."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def image_protocol(center_crop: int | None, resize: int | None, n: int | None,
                   seed: int) -> dict[str, Any]:
    """The image side of the protocol, as recorded."""
    return {"center_crop": center_crop, "resize": resize, "n_requested": n, "seed": seed}


def file_meta(extractor_provenance: dict[str, Any], protocol: dict[str, Any],
              image_set: dict[str, Any]) -> dict[str, Any]:
    """The ``meta`` of a feature file."""
    return {"extractor": extractor_provenance.get("spec"),
            "weights_sha256": extractor_provenance.get("weights_sha256"),
            "extractor_provenance": extractor_provenance, **protocol, "images": image_set}


def save_features(path: str | Path, features: np.ndarray, names: list[str], meta: dict[str, Any],
                  text_features: np.ndarray | None = None, captions: list[str | None] | None = None,
                  levels: list[Any] | None = None) -> Path:
    """Write a feature file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"features": features, "names": np.array(names, dtype=str),
                              "meta": np.array(json.dumps(meta))}
    if text_features is not None:
        arrays["text_features"] = text_features
    if captions is not None:
        arrays["captions"] = np.array(["" if c is None else c for c in captions], dtype=str)
    if levels is not None:
        arrays["levels"] = np.array([("", "") if lv is None else tuple(lv) for lv in levels],
                                    dtype=str).reshape(-1, 2)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_features(path: str | Path) -> dict[str, Any]:
    """A feature file as a dict (``levels`` as ``(tumor, til)`` tuples or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable feature file (.npz): {e}") from None
    missing = [k for k in ("features", "names", "meta") if k not in data]
    if missing:
        raise KeyError(f"{path}: missing {missing} (not written by scripts/evaluate.py?)")
    out: dict[str, Any] = {"path": path, "features": data["features"].astype(np.float64),
                           "names": [str(n) for n in data["names"]],
                           "meta": json.loads(str(data["meta"]))}
    if len(out["names"]) != len(out["features"]):
        raise ValueError(f"{path}: {len(out['names'])} names for {len(out['features'])} features")
    out["text_features"] = data.get("text_features")
    out["captions"] = ([str(c) or None for c in data["captions"]] if "captions" in data
                       else [None] * len(out["names"]))
    out["levels"] = ([tuple(lv) if lv[0] else None for lv in data["levels"].tolist()]
                     if "levels" in data else [None] * len(out["names"]))
    return out


def stats_protocol_path(stats_path: str | Path) -> Path:
    """The protocol sidecar ``<name>.protocol.json`` of a pytorch-fid statistics ``.npz``."""
    stats_path = Path(stats_path)
    stem = stats_path.name[:-4] if stats_path.name.endswith(".npz") else stats_path.name
    return stats_path.with_name(f"{stem}.protocol.json")


def stats_protocol(requested: dict[str, Any], images: Path, n_requested: int | None, seed: int,
                   n: int) -> dict[str, Any]:
    """The provenance of reference statistics: protocol, image set and its hash, versions."""
    from ldm.evaluation.images import is_store, list_image_files

    files = [images] if is_store(images) else list_image_files(images)
    return {**requested, "n_requested": n_requested, "seed": seed,
            "images": {"path": str(images.resolve()), "n": n, "sha256": files_sha256(files)},
            "packages": package_versions()}


def write_stats_protocol(stats_path: str | Path, record: dict[str, Any]) -> Path:
    """Write the protocol sidecar of a statistics ``.npz`` atomically."""
    from ldm.evaluation.images import write_json

    path = stats_protocol_path(stats_path)
    write_json(record, path)
    return path


def read_stats_protocol(stats_path: str | Path,
                        requested: dict[str, Any]) -> dict[str, Any] | None:
    """The protocol sidecar of ``stats_path`` after checking it against ``requested``.

    ``None`` when there is none (statistics written by pytorch-fid, or before the sidecar
    existed); :class:`ProtocolMismatch` when it records another protocol.
    """
    sidecar = stats_protocol_path(stats_path)
    if not sidecar.is_file():
        return None
    record = read_json_object(sidecar, "a protocol record (a JSON object)")
    check_protocol(record, requested, stats_path)
    return record


def files_sha256(files: list[Path]) -> str:
    """SHA-256 over the names and bytes of ``files`` (sorted): an image set's content hash."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_protocol(meta: dict[str, Any], expected: dict[str, Any], path: str | Path,
                   keys: tuple[str, ...] = PROTOCOL_KEYS) -> None:
    """Refuse features whose protocol differs from ``expected`` in any of ``keys``."""
    diff = {k: (meta.get(k), expected.get(k)) for k in keys
            if k in expected and meta.get(k) != expected.get(k)}
    if diff:
        details = "; ".join(f"{k}: file {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ProtocolMismatch(f"{path}: features made under another protocol ({details}); "
                               "recompute them or request the file's protocol")
