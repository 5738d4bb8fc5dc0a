"""The quick-start demo runs end to end (few steps) and leaves a checkpoint sample.py uses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end_with_few_steps(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PATHLDM_RUN_TIMESTAMP", None)
    out = tmp_path / "demo"
    cmd = [sys.executable, "scripts/demo.py", "--out", str(out), "--vq-steps", "3",
           "--ldm-steps", "4", "--n", "1", "--sample-steps", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PathLDM demo finished" in proc.stdout
    (run,) = (out / "logs").iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and "config" in ckpt
    meta = json.loads((out / "samples" / "metadata.json").read_text())
    assert meta["weights"] == "ema" and len(meta["images"]) == 4  # --n 1, four combinations
    assert (out / "samples" / "adherence.json").is_file() and "caption adherence" in proc.stdout
    assert (out / "samples" / "grid.png").is_file()
    assert "evaluation (tiny random CLIP features): FD" in proc.stdout
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert results["sample_sets"]["demo"]["n"] == 4 and (out / "evaluation" / "report.md").is_file()
    # a rerun finds every stage done and only re-samples (skipping existing images)
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and len(list((out / "logs").iterdir())) == 1


@pytest.mark.slow
def test_demo_defaults_show_the_captions_steering_the_samples(tmp_path):
    """The quick start as shipped: the tumor level moves the samples' hematoxylin OD by at least
    half of the real gap, the TIL level moves the hematoxylin contrast the right way, and most
    same-seed pairs (images differing only in the TIL level) move it that way too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PATHLDM_RUN_TIMESTAMP", None)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "caption adherence" in proc.stdout and "same-seed pairs: 24" in proc.stdout
    report = json.loads((out / "samples" / "adherence.json").read_text())
    assert report["n_generated"] == 48
    assert report["tumor"]["generated"]["n"] == {"low": 24, "high": 24}
    assert report["tumor"]["real_gap"] > 0 and report["tumor"]["ratio"] >= 0.5, report["tumor"]
    assert report["til"]["real_gap"] > 0 and report["til"]["right_direction"], report["til"]
    assert report["til"]["paired"]["positive_share"] > 0.5, report["til"]["paired"]
    assert report["passed"]
