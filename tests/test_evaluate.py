"""scripts/evaluate.py: extractors, saved features, protocol, memorisation, adherence, report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_loader import load_script
from tcga_store import write_store

from ldm.evaluation.features import FeatureWeightsNotFound, extract, load_extractor
from ldm.evaluation.memorisation import memorisation
from ldm.evaluation.prompt_adherence import probe_adherence
from ldm.evaluation.protocol import ProtocolMismatch
from ldm.evaluation.sources import open_image_set

LEVELS = [("low", "low"), ("low", "high"), ("high", "low"), ("high", "high")]


def _tile(rng: np.random.Generator, level: int, size: int = 32) -> np.ndarray:
    """A smooth tile whose colour depends on its tumor/TIL combination."""
    coarse = rng.integers(0, 120, size=(4, 4, 3)) + 40 * np.array([level, 3 - level, level % 2])
    return np.asarray(Image.fromarray(coarse.clip(0, 255).astype(np.uint8))
                      .resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A 48-tile training store, a folder of 24 'samples' (with samples.jsonl), a tiny CLIP."""
    from ldm.evaluation.tiny import build_tiny_clip

    base = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    levels = [i % 4 for i in range(48)]
    tiles = [_tile(rng, lv) for lv in levels]
    probs = {"tumor": [0.9 if lv >= 2 else 0.1 for lv in levels],
             "til": [0.9 if lv % 2 else 0.1 for lv in levels]}
    store = base / "train.h5"
    write_store(store, tiles, [i % 2 for i in range(48)], probs["tumor"], probs["til"],
                ["S1", "S2"], [["ductal carcinoma"], ["lobular carcinoma"]])
    samples = base / "samples"
    samples.mkdir()
    records = []
    for i in range(24):
        lv = i % 4
        Image.fromarray(_tile(rng, lv)).save(samples / f"{i:06d}.png")
        tumor, til = LEVELS[lv]
        records.append({"file": f"{i:06d}.png", "tumor": tumor, "til": til,
                        "caption": f"{tumor} tumor; {til} til; ductal carcinoma"})
    (samples / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (samples / "generation.json").write_text(json.dumps({"split": "train", "scale": 1.75}))
    return {"store": store, "samples": samples, "clip": build_tiny_clip(base / "clip")}


def _run(args: list[str]) -> dict:
    return load_script("evaluate").main(args + ["--device", "cpu", "--kid-subsets", "5",
                                                 "--kid-subset-size", "10", "--min-stratum",
                                                 "4", "--k", "3"])


def test_evaluate_report_saved_features_and_protocol(data, tmp_path):
    out = tmp_path / "out"
    spec = f"hf:{data['clip']}"
    _run(["--samples", f"train={data['samples']}", "--reference", str(data["store"]),
          "--extractor", spec, "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    m = saved["metrics"][spec]["train"]
    assert m["overall"]["n_real"] == 48 and m["overall"]["n_fake"] == 24
    assert {"fd", "kid", "precision", "recall", "density", "coverage"} <= set(m["overall"])
    assert set(m["strata"]) == {f"{t} tumor / {i} TIL" for t, i in LEVELS}
    assert all("fd" in s for s in m["strata"].values())
    proto = saved["protocol"]
    assert len(proto["reference"]["sha256"]) == 64 and proto["reference"]["formats"] == {
        "JPEG": 48}
    assert len(proto["extractors"][spec]["weights_sha256"]) == 64
    assert proto["packages"]["torch"] == torch.__version__.split("+")[0] or proto["packages"][
        "torch"]
    assert saved["sample_sets"]["train"]["scale"] == 1.75 and saved["flags"] == []
    ti = saved["text_image"]["sets"]
    assert set(ti) == {"train", "real-reference"} and ti["train"]["n"] == 24
    probe = saved["probe"][spec]["train"]
    assert probe["tumor"]["real_held_out_accuracy"] is not None
    for name in ("report.md", "precision_recall.png", "strata_fd.png",
                 "nearest_neighbours.png"):
        assert (out / name).stat().st_size > 0, name
    assert "## Memorisation" in (out / "report.md").read_text()
    (path,) = (out / "features" / "train").glob("features_hf_*.npz")
    feats = np.load(path)
    assert feats["features"].shape == (24, 16) and feats["names"][0] == "000000.png"

    # metrics again from the saved features alone, with another k: same FD, no network
    again = _run(["--samples", f"train={data['samples']}", "--features-only", "--extractor",
                  spec, "--out", str(out), "--k", "2"])
    assert again["metrics"][spec]["train"]["overall"]["fd"] == pytest.approx(m["overall"]["fd"])
    # the saved reference under another protocol is an error, not a silent comparison
    with pytest.raises(ProtocolMismatch, match="resize"):
        _run(["--samples", f"train={data['samples']}", "--features-only", "--extractor", spec,
              "--out", str(out), "--resize", "16"])
    # sample features from other weights than the reference's: refused
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "weights_sha256": "0" * 64}))
    np.savez(path, **arrays)
    with pytest.raises(ProtocolMismatch, match="weights_sha256"):
        _run(["--samples", f"train={data['samples']}", "--features-only", "--extractor", spec,
              "--out", str(out)])
    with pytest.raises(ProtocolMismatch, match="resize"):
        _run(["--samples", f"train={data['samples']}", "--reference", str(data["store"]),
              "--reference-features",
              str(next((out / "features" / "real-reference").glob("*.npz"))),
              "--extractor", spec, "--out", str(tmp_path / "other"), "--resize", "32"])


def test_jpeg_samples_flagged_and_exact_copy_memorised(data, tmp_path):
    """Samples saved as JPEG are flagged; a copy of a training patch is found as memorised."""
    from ldm.evaluation.images import SplitStore

    folder = tmp_path / "jpeg"
    folder.mkdir()
    for f in sorted(data["samples"].glob("*.png"))[:11]:
        Image.open(f).save(folder / f"{f.stem}.jpg", quality=90)
    copy = SplitStore(data["store"]).image(5)
    copy.save(folder / "copy.png")
    res = _run(["--samples", str(folder), "--reference", str(data["store"]), "--extractor",
                f"hf:{data['clip']}", "--out", str(tmp_path / "out"), "--text-extractor",
                "none", "--train", str(data["store"])])
    assert len(res["flags"]) == 1 and "11 of 12 images are JPEG" in res["flags"][0]
    mem = res["memorisation"][f"hf:{data['clip']}"]["jpeg"]
    assert mem["n_exact_copies"] == 1 and mem["n_flagged"] >= 1
    assert mem["closest_pairs"][0] == {"sample": "copy.png", "train": "train.h5[5]",
                                       "distance": 0.0, "ratio": 0.0}
    assert res["text_image"] is None and res["protocol"]["train"]["n"] == 48
    assert res["probe"][f"hf:{data['clip']}"]["jpeg"]["tumor"]["real_held_out_n"] == 9


def test_memorisation_flags_exact_copy():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((200, 8))
    samples = np.vstack([rng.standard_normal((30, 8)), train[17:18]])
    res = memorisation(samples, train, percentile=1.0, block_elements=500)
    assert res["flagged"][-1] and res["nearest_index"][-1] == 17 and res["distance"][-1] == 0
    assert res["n_exact_copies"] == 1 and res["closest"][0] == 30
    assert res["fraction_flagged"] < 0.2


def test_probe_accuracy_on_separable_features():
    """Levels shift the features: the probe is right on real held-out and obeying samples."""
    rng = np.random.default_rng(1)

    def make(n: int, flip: bool = False) -> tuple[np.ndarray, list]:
        lv = [LEVELS[i % 4] for i in range(n)]
        x = rng.standard_normal((n, 6))
        x[:, 0] += [6.0 * (t == "high") for t, _ in lv]
        x[:, 1] += [6.0 * (i == "high") for _, i in lv]
        asked = [(("low" if t == "high" else "high"), i) for t, i in lv] if flip else lv
        return x, asked

    (tr, tr_lv), (ho, ho_lv), (sa, sa_lv) = make(400), make(100), make(100)
    res = probe_adherence(tr, tr_lv, ho, ho_lv, sa, sa_lv)
    assert res["tumor"]["real_held_out_accuracy"] > 0.9
    assert res["tumor"]["samples_accuracy"] > 0.9 and res["til"]["samples_accuracy"] > 0.9
    bad, bad_lv = make(100, flip=True)  # samples that ignore the requested tumor level
    res = probe_adherence(tr, tr_lv, ho, ho_lv, bad, bad_lv)
    assert res["tumor"]["samples_accuracy"] < 0.1 and res["til"]["samples_accuracy"] > 0.9


def test_inception_extractor_equals_pytorch_fid(tmp_path, monkeypatch):
    """The inception extractor on a folder gives pytorch-fid's activations."""
    from pytorch_fid.fid_score import get_activations
    from test_fid import random_fid_inception_state_dict, write_folder

    from ldm.evaluation.fid import FID_WEIGHTS_FILE

    weights = tmp_path / FID_WEIGHTS_FILE
    torch.save(random_fid_inception_state_dict(), weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "home" / "hub" / "checkpoints" / FID_WEIGHTS_FILE).symlink_to(weights)
    folder = write_folder(tmp_path / "imgs", 6, seed=1)
    ext = load_extractor("inception:64", inception_weights=weights)
    images = open_image_set(folder)
    ours = extract(ext, images.load, len(images), batch_size=4)
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[64]]).eval()
    theirs = get_activations(sorted(str(f) for f in folder.glob("*.png")), model, batch_size=4,
                             dims=64, device="cpu", num_workers=0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_timm_local_dir_and_missing_weights(tmp_path):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_vit"), tmp_path / "vit")
    ext = load_extractor(f"timm:{tmp_path / 'vit'},drop_rate=0.0")
    x = ext.preprocess(Image.new("RGB", (40, 40), (200, 100, 150)))
    assert tuple(x.shape) == (3, 160, 160) and ext.embed(x[None]).shape == (1, 64)
    assert ext.provenance["preprocessing"]["interpolation"] == "bicubic"
    with pytest.raises(FeatureWeightsNotFound, match="huggingface-cli download"):
        load_extractor("hf:nobody-has/this-model")
    with pytest.raises(FeatureWeightsNotFound, match="does not exist"):
        load_extractor(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown extractor"):
        load_extractor("resnet")


def test_generated_store_parts_and_guidance_plot(tmp_path):
    """part-*.h5 of fid.py generate --format store: captions, levels, JPEG; the sweep plot."""
    from tcga_store import jpeg_bytes

    from data_prep.hdf5io import write_split_store
    from ldm.evaluation import report

    rng = np.random.default_rng(2)
    for part in range(2):
        caps = [f"{t} tumor; {i} til; summary" for t, i in LEVELS[part * 2: part * 2 + 2]]
        write_split_store(tmp_path / f"part-{part:06d}.h5",
                          [jpeg_bytes(_tile(rng, k)) for k in range(2)], np.zeros(2, int),
                          np.array([part, part], float), np.array([0.0, 1.0]), ["S1"],
                          [["summary"]], attrs={"split": "generated"},
                          extra={"caption": np.array(caps, dtype=object)})
    images = open_image_set(tmp_path)
    assert images.kind == "store-parts" and len(images) == 4
    assert images.levels == LEVELS and images.captions[3] == "high tumor; high til; summary"
    assert images.format_counts() == {"JPEG": 4} and images.load(0).size == (32, 32)

    results = {"metrics": {"inception": {
        f"s{s}": {"overall": {"fd": 10.0 / s}} for s in (1, 2)}},
        "sample_sets": {f"s{s}": {"scale": float(s), "split": "train"} for s in (1, 2)}}
    sweep = {"results": [{"scale": s, "split": "test", "fid": 5.0 + s} for s in (1.0, 3.0)]}
    points = report.guidance_points(results, sweep)
    assert {p["label"] for p in points} == {"FID (test prompts, fid.py sweep)",
                                            "FD inception (train)"}
    png = report.plot_guidance(points, tmp_path / "guidance.png")
    assert png is not None and Image.open(png).size[0] > 100


def test_open_clip_extractor_embeds_images_and_text(tmp_path):
    """open_clip:<model>: its own preprocessing, image and text towers (a tiny config)."""
    import open_clip

    from ldm.evaluation.features import embed_texts

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                          "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    (tmp_path / "tiny-eval-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    ext = load_extractor("open_clip:tiny-eval-clip")
    x = ext.preprocess(Image.new("RGB", (64, 48), (200, 100, 150)))
    assert tuple(x.shape) == (3, 32, 32) and ext.embed(x[None]).shape == (1, 16)
    assert embed_texts(ext, ["low tumor; high til; summary"] * 3).shape == (3, 16)
