"""FID/KID: agreement with pytorch-fid on the same folders, KID on known inputs, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_loader import load_script
from tcga_store import write_store

from ldm.evaluation.fid import (
    FID_WEIGHTS_FILE,
    InceptionWeightsNotFound,
    features_path,
    load_inception,
    load_statistics,
)
from ldm.evaluation.images import SplitStore
from ldm.evaluation.metrics import kid
from ldm.evaluation.sampling import caption_plan

ROOT = Path(__file__).resolve().parents[1]



def random_fid_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the exact layout of pytorch-fid's FID Inception (no download)."""
    from pytorch_fid import inception as pfi

    torch.manual_seed(seed)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net.state_dict()


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds random FID Inception weights under the real name."""
    home = tmp_path_factory.mktemp("torch_home")
    ckpt_dir = home / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(random_fid_inception_state_dict(), ckpt_dir / FID_WEIGHTS_FILE)
    return home


def write_folder(folder: Path, n: int, seed: int, size: int = 40, ext: str = "png") -> Path:
    """``n`` smooth random RGB images; ``seed`` also shifts the colour distribution."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256 - 40 * (seed % 3), size=(5, 5, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        img.save(folder / f"{i:03d}.{ext}")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("fid_images")
    return write_folder(base / "real", 12, seed=1), write_folder(base / "fake", 10, seed=2)


def test_fid_matches_pytorch_fid(torch_home, folders, tmp_path, monkeypatch):
    """ref-stats + score give pytorch-fid's FID; the npz is what pytorch-fid would save."""
    from pytorch_fid.fid_score import (
        calculate_fid_given_paths,
        compute_statistics_of_path,
        save_fid_stats,
    )

    real, fake = folders
    monkeypatch.setenv("TORCH_HOME", str(torch_home))  # pytorch-fid reads its hub cache
    expected = calculate_fid_given_paths([str(real), str(fake)], batch_size=8, device="cpu",
                                         dims=64, num_workers=0)
    theirs = tmp_path / "theirs.npz"
    save_fid_stats([str(real), str(theirs)], batch_size=8, device="cpu", dims=64, num_workers=0)

    fid = load_script("fid")
    weights = torch_home / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    ref = tmp_path / "ref.npz"
    common = ["--dims", "64", "--batch-size", "8", "--device", "cpu",
              "--inception-weights", str(weights), "--no-download"]
    fid.main(["ref-stats", "--images", str(real), "--out", str(ref), *common])
    out = tmp_path / "scores.json"
    rows = fid.main(["score", "--ref", str(ref), "--samples", str(fake), "--out", str(out),
                     "--kid-subsets", "5", *common])

    assert expected > 0
    assert rows[0]["fid"] == pytest.approx(expected, rel=1e-6)
    assert json.loads(out.read_text())["results"][0]["fid"] == pytest.approx(expected, rel=1e-6)
    mu, sigma, feats = load_statistics(ref)
    with np.load(theirs) as f:
        np.testing.assert_allclose(mu, f["mu"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sigma, f["sigma"], rtol=1e-10, atol=1e-12)
    with np.load(ref) as f, np.load(theirs) as g:
        assert sorted(f.files) == ["mu", "sigma"]
        assert f["mu"].dtype == f["sigma"].dtype == g["sigma"].dtype == np.float64
    assert feats.shape == (12, 64)
    # pytorch-fid reads our npz as its own reference statistics, and we read theirs
    m, s = compute_statistics_of_path(str(ref), None, 8, 64, "cpu")
    assert np.array_equal(m, mu) and np.array_equal(s, sigma)
    m, s, none = load_statistics(theirs)
    assert none is None and np.allclose(m, mu, rtol=1e-10) and np.allclose(s, sigma, rtol=1e-10)
    # the same images from a folder reference (features computed on the fly) agree as well
    rows = fid.main(["score", "--ref", str(real), "--samples", str(fake), "--out", str(out),
                     "--kid-subsets", "5", *common])
    assert rows[0]["fid"] == pytest.approx(expected, rel=1e-6)
    assert rows[0]["kid"] > 0
    # the statistics carry their protocol; scoring under another one is refused
    from ldm.evaluation.protocol import ProtocolMismatch, stats_protocol_path

    proto = json.loads(stats_protocol_path(ref).read_text())
    assert proto["extractor"] == "inception:64" and proto["images"]["n"] == 12
    assert len(proto["images"]["sha256"]) == 64 and len(proto["weights_sha256"]) == 64
    with pytest.raises(ProtocolMismatch, match="resize: file None vs requested 40"):
        fid.main(["score", "--ref", str(ref), "--samples", str(fake), "--out", str(out),
                  "--resize", "40", *common])


def test_ref_stats_from_store_with_crop(torch_home, tmp_path):
    """A split store gives the statistics of its decoded, centre-cropped tiles."""
    rng = np.random.default_rng(0)
    images = [np.asarray(Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
                         .resize((48, 48), Image.BILINEAR)) for _ in range(6)]
    store = write_store(tmp_path / "train.h5", images, [0, 0, 0, 1, 1, 1], rng.random(6),
                        rng.random(6), ["s0", "s1"], [["a"], ["b"]])
    folder = tmp_path / "cropped"
    folder.mkdir()
    ds = SplitStore(store)
    for i in range(len(ds)):  # the same crop done by hand, saved losslessly
        ds.image(i).crop((8, 8, 40, 40)).save(folder / f"{i}.png")
    fid = load_script("fid")
    weights = torch_home / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    common = ["--dims", "64", "--device", "cpu", "--inception-weights", str(weights)]
    fid.main(["ref-stats", "--images", str(store), "--center-crop", "32",
              "--out", str(tmp_path / "a.npz"), *common])
    fid.main(["ref-stats", "--images", str(folder), "--out", str(tmp_path / "b.npz"), *common])
    a, b = load_statistics(tmp_path / "a.npz"), load_statistics(tmp_path / "b.npz")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-9)
    assert features_path(tmp_path / "a.npz").name == "a.features.npy"


def test_kid_known_value():
    """x = {0, 1}, y = {1, 2} in 1-D: (1 + 27) - 2 * (1 + 1 + 8 + 27) / 4 = 9.5 exactly."""
    x = np.array([[0.0], [1.0]])
    y = np.array([[1.0], [2.0]])
    mean, std = kid(x, y, num_subsets=7, subset_size=10)
    assert mean == pytest.approx(9.5)
    assert std == pytest.approx(0.0)
    assert kid(y, x, num_subsets=3)[0] == pytest.approx(9.5)


def test_kid_is_unbiased_mmd_on_full_sets():
    """With subsets covering the sets, KID equals the unbiased MMD² written as plain sums."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 4)), rng.normal(loc=0.5, size=(7, 4))

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    m = 7
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert kid(x, y, num_subsets=2)[0] == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)
    same = rng.normal(size=(400, 4))
    assert abs(kid(same[:200], same[200:], num_subsets=20, subset_size=100)[0]) < 0.05


def test_missing_inception_weights_is_actionable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(InceptionWeightsNotFound) as e:
        load_inception(64, allow_download=False)
    msg = str(e.value)
    assert FID_WEIGHTS_FILE in msg and "--inception-weights" in msg
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in msg
    assert "https://github.com/mseitzer/pytorch-fid/releases" in msg
    with pytest.raises(InceptionWeightsNotFound, match="does not exist"):
        load_inception(64, weights=tmp_path / "nope.pth")


def test_cli_help_and_failure_exit(folders, tmp_path, capsys):
    """--help explains the subcommands; missing weights end with status 1 and the file name."""
    with pytest.raises(SystemExit) as e:
        load_script("fid").main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("ref-stats", "generate", "score", "sweep", "held-out", "--shard"):
        assert word in text
    script = str(ROOT / "scripts" / "fid.py")
    real, _ = folders
    env = {"TORCH_HOME": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}  # this tree, also where another is installed
    out = subprocess.run([sys.executable, script, "ref-stats", "--images", str(real), "--out",
                          str(tmp_path / "r.npz"), "--no-download", "--device", "cpu"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert FID_WEIGHTS_FILE in out.stderr
    assert not (tmp_path / "r.npz").exists()


def test_caption_plan_from_store(tmp_path):
    """Each sample takes a real patch's levels and a summary of its slide, seeded per index."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    tumor = [0.1, 0.9, np.nan, 0.5, 1.0]
    til = [0.7, 0.2, 0.3, 0.49, 0.0]
    store = write_store(tmp_path / "test.h5", images, [0, 1, 1, 2, 0], tumor, til,
                        ["A", "B", "C"], [["a0", "a1"], ["b0"], []], split="test")
    plan = caption_plan(SplitStore(store), 40, seed=5, sampling="data")
    assert plan[:10] == caption_plan(SplitStore(store), 10, seed=5, sampling="data")
    assert plan != caption_plan(SplitStore(store), 40, seed=6, sampling="data")
    used = {r["patch_index"] for r in plan}
    assert used <= {0, 1, 4}  # patch 2 has NaN tumor, patch 3's slide has no summary
    expected = {0: ("low", "high", 1, "A"), 1: ("high", "low", 2, "B"), 4: ("high", "low", 2, "A")}
    for r in plan:
        tumor_level, til_level, label, slide = expected[r["patch_index"]]
        assert (r["tumor"], r["til"], r["class_label"], r["slide"]) == (
            tumor_level, til_level, label, slide)
        summary = {"A": ["a0", "a1"], "B": ["b0"]}[slide][r["summary_index"]]
        assert r["caption"] == f"{tumor_level} tumor; {til_level} til; {summary}"
    assert len({r["seed"] for r in plan}) == 40


def test_uniform_prompts_draw_combinations_and_slides_uniformly(tmp_path):
    """uniform (the paper's protocol): combinations and slides uniform, whatever the data's."""
    rng = np.random.default_rng(1)
    n = 20  # slide A: 2 patches, slide B: 18, every patch low tumor / low til
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
    store = SplitStore(write_store(tmp_path / "train.h5", images, [0, 0] + [1] * (n - 2),
                                   [0.1] * n, [0.2] * n, ["A", "B", "C"],
                                   [["a0", "a1"], ["b0"], []], split="train"))
    uniform = caption_plan(store, 800, seed=3)  # the default
    data = caption_plan(store, 800, seed=3, sampling="data")
    combos = {(r["tumor"], r["til"]): 0 for r in uniform}
    for r in uniform:
        combos[(r["tumor"], r["til"])] += 1
    assert sorted(combos) == [("high", "high"), ("high", "low"), ("low", "high"), ("low", "low")]
    assert all(160 < c < 240 for c in combos.values())  # 200 each expected
    assert {r["class_label"] for r in uniform} == {0, 1, 2, 3}
    assert 340 < sum(r["slide"] == "A" for r in uniform) < 460  # 400: slides uniformly
    assert {r["slide"] for r in uniform} == {"A", "B"}  # C has no summary
    assert all(r["patch_index"] is None for r in uniform)
    assert all(r["caption"] == f"{r['tumor']} tumor; {r['til']} til; "
               + {"A": ["a0", "a1"], "B": ["b0"]}[r["slide"]][r["summary_index"]]
               for r in uniform)
    assert {(r["tumor"], r["til"]) for r in data} == {("low", "low")}
    assert sum(r["slide"] == "A" for r in data) < 140  # 80 expected: slides by patch count
    with pytest.raises(ValueError, match="prompt sampling"):
        caption_plan(store, 1, sampling="patches")


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, tiny_clip_dir) -> Path:
    """An (untrained, random) tiny text-conditional LDM with embedded config and EMA."""
    from tiny_ldm import build_tiny_model, save_checkpoint, tiny_model_config

    cfg = tiny_model_config(tiny_clip_dir, use_ema=True)
    return save_checkpoint(build_tiny_model(cfg), tmp_path_factory.mktemp("ldm") / "m.ckpt",
                           {"model": cfg})


def split_store(path: Path, split: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    images = [np.asarray(Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
                         .resize((16, 16), Image.BILINEAR)) for _ in range(6)]
    summaries = [[f"{split} a0", f"{split} a1"], [f"{split} b"]]
    return write_store(path, images, [0, 0, 0, 1, 1, 1], rng.random(6), rng.random(6),
                       [f"{split}-A", f"{split}-B"], summaries, split=split)


def test_generate_sharded_resumable(text_ckpt, tmp_path):
    """Two shards give the images of one unsharded run; reruns skip; other settings refuse."""
    fid = load_script("fid")
    store = split_store(tmp_path / "test.h5", "test", seed=3)
    common = ["generate", "--ckpt", str(text_ckpt), "--store", str(store), "--n", "5",
              "--steps", "2", "--device", "cpu", "--seed", "4"]
    for shard in ("0/2", "1/2"):
        fid.main([*common, "--outdir", str(tmp_path / "sh"), "--shard", shard,
                  "--batch-size", "2"])
    whole = fid.main([*common, "--outdir", str(tmp_path / "one"), "--batch-size", "5"])
    assert whole["generated"] == 5
    names = [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "sh").glob("*.png")) == names
    for name in names:
        a = np.asarray(Image.open(tmp_path / "sh" / name), dtype=int)
        b = np.asarray(Image.open(tmp_path / "one" / name), dtype=int)
        assert np.abs(a - b).max() <= 1, name
    records = [json.loads(line) for line in (tmp_path / "sh" / "samples.jsonl").open()]
    assert [r["file"] for r in records] == names
    assert all(r["caption"].startswith(f"{r['tumor']} tumor; {r['til']} til; test ")
               for r in records)
    meta = json.loads((tmp_path / "sh" / "generation.json").read_text())
    assert (meta["split"], meta["n"], meta["weights"], meta["scale"]) == ("test", 5, "ema", 1.75)
    assert meta["prompt_sampling"] == "uniform"
    again = fid.main([*common, "--outdir", str(tmp_path / "sh"), "--shard", "1/2"])
    assert again["generated"] == 0 and again["shard_size"] == 2
    with pytest.raises(ValueError, match="other settings.*scale"):
        fid.main([*common, "--outdir", str(tmp_path / "sh"), "--scale", "3"])
    with pytest.raises(ValueError, match="other settings.*prompt_sampling"):
        fid.main([*common, "--outdir", str(tmp_path / "sh"), "--prompt-sampling", "data"])


def test_sweep_reports_train_and_held_out_prompts(text_ckpt, torch_home, tmp_path, capsys):
    fid = load_script("fid")
    train = split_store(tmp_path / "train.h5", "train", seed=5)
    test = split_store(tmp_path / "test.h5", "test", seed=6)
    weights = torch_home / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    inception = ["--dims", "64", "--inception-weights", str(weights), "--no-download",
                 "--kid-subsets", "3", "--device", "cpu"]
    fid.main(["ref-stats", "--images", str(train), "--out", str(tmp_path / "ref.npz"),
              *inception])
    rows = fid.main(["sweep", "--ckpt", str(text_ckpt), "--ref", str(tmp_path / "ref.npz"),
                     "--train-store", str(train), "--test-store", str(test), "--scales", "1",
                     "2.5", "--n", "3", "--steps", "2", "--batch-size", "3",
                     "--outdir", str(tmp_path / "sweep"), "--prompt-sampling", "data",
                     *inception])
    assert {r["prompt_sampling"] for r in rows} == {"data"}
    assert [(r["scale"], r["split"], r["n"]) for r in rows] == [
        (1.0, "train", 3), (1.0, "test", 3), (2.5, "train", 3), (2.5, "test", 3)]
    assert all(np.isfinite(r["fid"]) and "kid" in r for r in rows)
    assert (tmp_path / "sweep" / "scale_2.5" / "test" / "000002.png").is_file()
    text = capsys.readouterr().out
    assert "FID train prompts" in text and "FID test prompts" in text
    saved = json.loads((tmp_path / "sweep" / "sweep_results.json").read_text())
    assert [r["fid"] for r in saved["results"]] == [r["fid"] for r in rows]
    assert saved["prompt_sampling"] == "data"
    plan = [json.loads(line) for line in
            (tmp_path / "sweep" / "scale_1" / "train" / "samples.jsonl").open()]
    assert all(r["patch_index"] is not None for r in plan)
