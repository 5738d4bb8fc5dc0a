"""cas.py end to end on tiny stores and generated folders (1 epoch, 16-pixel patches)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_loader import load_script
from tcga_store import write_store

from ldm.evaluation.cas import (
    evaluate_classifier,
    imagenet_weights_path,
    labelled_dataset,
    resnet34,
    synthetic_labels,
    train_classifier,
)


def tiles(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                       .resize((32, 32), Image.BILINEAR)) for _ in range(n)]


def store(path: Path, tumor: list[float], seed: int) -> Path:
    n = len(tumor)
    return write_store(path, tiles(n, seed), [i % 2 for i in range(n)], tumor, [0.2] * n,
                       ["s0", "s1"], [["sum a"], ["sum b"]])


def generated_folder(folder: Path, levels: list[str], fmt: str) -> Path:
    """A folder as fid.py generate (samples.jsonl) or sample.py (metadata.json) leaves it."""
    folder.mkdir()
    records = []
    for i, (img, level) in enumerate(zip(tiles(len(levels), 7), levels)):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
        caption = f"{level} tumor; low til; a summary"
        records.append({"file": f"{i:06d}.png", "caption": caption, "tumor": level}
                       if fmt == "jsonl" else {"file": f"{i:06d}.png", "prompt": caption})
    if fmt == "jsonl":
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        (folder / "metadata.json").write_text(json.dumps({"images": records}))
    return folder


def test_synthetic_labels_from_both_formats(tmp_path):
    a = generated_folder(tmp_path / "a", ["high", "low", "high"], "jsonl")
    b = generated_folder(tmp_path / "b", ["low", "high"], "json")
    (a / "000001.png").unlink()  # missing images are skipped
    assert synthetic_labels(a) == ([a / "000000.png", a / "000002.png"], [1, 1])
    assert synthetic_labels(b) == ([b / "000000.png", b / "000001.png"], [0, 1])
    with pytest.raises(FileNotFoundError, match="samples.jsonl or metadata.json"):
        synthetic_labels(tmp_path)


def test_cas_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_cache"))  # no ImageNet weights here
    train = store(tmp_path / "train.h5", [0.1, 0.9, 0.2, 0.8, np.nan, 0.7], seed=1)
    test = store(tmp_path / "test.h5", [0.3, 0.6, np.nan, 1.0, 0.0], seed=2)
    synth = generated_folder(tmp_path / "gen", ["high", "low", "high", "low"], "jsonl")
    out = tmp_path / "cas.json"
    args = ["--real-train", str(train), "--real-test", str(test), "--synthetic", str(synth),
            "--synthetic-name", "PathLDM", "--epochs", "1", "--batch-size", "4",
            "--image-size", "16", "--device", "cpu", "--out", str(out), "--flip"]
    rows = load_script("cas").main(args)
    text = capsys.readouterr().out
    for word in ("Data type", "Accuracy (%)", "Real + Synthetic", "Only Synthetic", "PathLDM"):
        assert word in text
    assert [r["mode"] for r in rows] == ["real", "synthetic", "real+synthetic"]
    assert [r["n_train"] for r in rows] == [5, 4, 9]  # NaN tumor_prob patch left out
    for r in rows:
        assert r["n"] == 4  # NaN test patch left out
        assert r["accuracy"] in (0.0, 25.0, 50.0, 75.0, 100.0)
        assert np.sum(r["confusion"]) == 4 and np.sum(r["confusion"], axis=1).tolist() == [2, 2]
        assert len(r["train_loss"]) == 1 and np.isfinite(r["train_loss"][0])
    saved = json.loads(out.read_text())
    assert saved["pretrained"] is None and saved["epochs"] == 1 and len(saved["results"]) == 3


def test_training_is_seeded(tmp_path):
    """Same seed, same losses and predictions (shuffling, flips, init); another seed differs."""
    folder = generated_folder(tmp_path / "g", ["high", "low", "high", "low", "low"], "jsonl")
    dataset = labelled_dataset(None, None, None, [synthetic_labels(folder)], None)

    def run(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                    torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 2))
        losses = train_classifier(model, dataset, epochs=3, batch_size=2, milestones=[1],
                                  seed=seed, flip=True)
        return losses, evaluate_classifier(model, dataset, batch_size=2)

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first[0] != other[0]
    assert first[1]["n"] == 5 and sum(map(sum, first[1]["confusion"])) == 5


def test_pretrained_weights(tmp_path, monkeypatch):
    """An ImageNet state_dict is loaded (head replaced); a missing --pretrained file fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert imagenet_weights_path() is None
    import torchvision

    ref = torchvision.models.resnet34(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / "resnet34-b627a593.pth")
    path = imagenet_weights_path()
    assert path == cache / "resnet34-b627a593.pth"
    model = resnet34(2, path)
    assert torch.equal(model.conv1.weight, ref.conv1.weight)
    assert model.fc.out_features == 2
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        imagenet_weights_path(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="need --real-train"):
        load_script("cas").main(["--real-test", "x.h5", "--modes", "real"])
