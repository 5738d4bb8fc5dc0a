"""fid.py refuses bad inputs with one line naming them, before the Inception network runs."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scripts_loader import load_script

from ldm.evaluation.fid import InceptionWeightsNotFound, load_statistics, save_statistics


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty TORCH_HOME: reaching the Inception means every input check passed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _folder(path: Path, sizes: list[int]) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, s in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def _stats(path: Path, d: int = 4) -> Path:
    save_statistics(path, np.zeros(d), np.eye(d))
    return path


def _one_line_error(argv: list[str], exc: type = ValueError) -> str:
    with pytest.raises(exc) as err:
        load_script("fid").main(argv)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_mixed_sizes_are_refused_naming_the_sizes(tmp_path, no_weights):
    mixed = _folder(tmp_path / "mixed", [40, 40, 32])
    ref = _stats(tmp_path / "ref.npz")
    base = ["score", "--ref", str(ref), "--no-download", "--device", "cpu"]
    msg = _one_line_error([*base, "--samples", str(mixed)])
    assert str(mixed) in msg and "40x40: 2" in msg and "32x32: 1" in msg and "--resize" in msg
    msg = _one_line_error(["ref-stats", "--images", str(mixed), "--out", str(tmp_path / "r.npz"),
                           "--no-download", "--device", "cpu"])
    assert "2 sizes" in msg
    # an explicit resize makes them one size: the checks pass and only the weights are missing
    with pytest.raises(InceptionWeightsNotFound):
        load_script("fid").main([*base, "--samples", str(mixed), "--resize", "32"])


@pytest.mark.parametrize("content", [
    b"", b"not an npz", b"PK\x03\x04truncated", "zip_truncated", "no_sigma", "nan", "shape",
])
def test_corrupt_reference_statistics(tmp_path, no_weights, content):
    ref = tmp_path / "ref.npz"
    if content == "zip_truncated":
        ref.write_bytes(_stats(tmp_path / "good.npz").read_bytes()[:60])
    elif content == "no_sigma":
        np.savez(ref, mu=np.zeros(4))
    elif content == "nan":
        np.savez(ref, mu=np.full(4, np.nan), sigma=np.eye(4))
    elif content == "shape":
        np.savez(ref, mu=np.zeros(4), sigma=np.eye(3))
    else:
        ref.write_bytes(content)
    samples = _folder(tmp_path / "s", [16, 16])
    exc = KeyError if content == "no_sigma" else ValueError
    msg = _one_line_error(["score", "--ref", str(ref), "--samples", str(samples),
                           "--no-download", "--device", "cpu"], exc)
    assert str(ref) in msg


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_corrupt_protocol_sidecar(tmp_path, no_weights, content):
    ref = _stats(tmp_path / "ref.npz")
    (tmp_path / "ref.protocol.json").write_text(content)
    samples = _folder(tmp_path / "s", [16, 16])
    msg = _one_line_error(["score", "--ref", str(ref), "--samples", str(samples),
                           "--no-download", "--device", "cpu"])
    assert str(tmp_path / "ref.protocol.json") in msg


def test_corrupt_features_sidecar(tmp_path):
    ref = _stats(tmp_path / "ref.npz")
    (tmp_path / "ref.features.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(ValueError, match="ref.features.npy: not a readable features file"):
        load_statistics(ref)


def test_empty_split_store(tmp_path, no_weights):
    store = tmp_path / "empty.h5"
    with h5py.File(store, "w") as f:
        f.create_dataset("images", shape=(0,), dtype=h5py.vlen_dtype(np.uint8))
    ref = _stats(tmp_path / "ref.npz")
    samples = _folder(tmp_path / "s", [16, 16])
    for argv in (["ref-stats", "--images", str(store), "--out", str(tmp_path / "r.npz")],
                 ["score", "--ref", str(store), "--samples", str(samples)],
                 ["score", "--ref", str(ref), "--samples", str(samples), str(tmp_path / "none")]):
        exc = FileNotFoundError if argv[-1].endswith("none") else ValueError
        msg = _one_line_error([*argv, "--no-download", "--device", "cpu"], exc)
        assert ("holds no images" in msg and str(store) in msg) or "none" in msg
