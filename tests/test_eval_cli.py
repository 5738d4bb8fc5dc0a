"""Shared evaluation CLI helpers: device resolution, shard parsing."""
import pytest
import torch

from ldm.evaluation.cli import parse_shard, resolve_device


def test_auto_device_without_torch_accelerator_api(monkeypatch):
    """torch < 2.6 has no torch.accelerator: fall back to CUDA when present, else CPU."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.delattr(torch, "accelerator", raising=False)
    assert resolve_device("auto").type == expected


def test_explicit_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cpu"):
            resolve_device("cuda")


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1"):
        with pytest.raises(ValueError):
            parse_shard(bad)
