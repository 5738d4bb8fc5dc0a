"""Safe checkpoint loading: weights-only with an allow-list, --trust-checkpoint, damaged files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts_loader import load_script
from tcga_store import random_store

from ldm.checkpoint import CheckpointError, load_model, read_checkpoint
from ldm.util import read_state_dict

ROOT = Path(__file__).resolve().parents[1]


class _MakeDir:
    """Unpickling this runs ``os.makedirs(path)``: a stand-in for a malicious checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small module saved as main.py would (the loader does not care what the model is)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    cfg = {"target": "torch.nn.Identity"}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 3, "epoch": 0,
                "config": {"model": cfg, "data": {}, "lightning": {}}}, path)
    return cfg, model, path


def _compvis_checkpoint(model: torch.nn.Module, cfg: dict) -> dict:
    """What Lightning 1.x (CompVis/PathLDM's trainer) wrote: callback states keyed by class,
    numpy scalars and arrays among the callback and loop states."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    return {"state_dict": model.state_dict(), "epoch": 3, "global_step": 1234,
            "pytorch-lightning_version": "1.4.2", "config": {"model": cfg},
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1),
                                            "best_model_path": "logs/x.ckpt",
                                            "current_score": np.float64(0.2)},
                          EarlyStopping: {"wait_count": 0, "best": np.array([0.5])}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}],
            "lr_schedulers": [{"lr_lambdas": [{"f_start": np.float32(1e-6)}]}],
            "loops": {"dtype": np.dtype("float32")}}


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy_pickle_format"])
def test_compvis_lightning1_checkpoints_load_weights_only(tiny, tmp_path, zipfile):
    cfg, model, _ = tiny
    path = tmp_path / "compvis.ckpt"
    torch.save(_compvis_checkpoint(model, cfg), path, _use_new_zipfile_serialization=zipfile)
    ckpt = read_checkpoint(path)
    assert ckpt["global_step"] == 1234 and len(ckpt["callbacks"]) == 2
    sd = read_state_dict(path)  # the ckpt_path (init checkpoint) path
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v) and torch.equal(ckpt["state_dict"][k], v), k


def test_malicious_pickle_is_refused_unless_trusted(tiny, tmp_path):
    _, model, _ = tiny
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": model.state_dict(), "x": _MakeDir(marker)}, path)
    for load in (read_checkpoint, read_state_dict, load_model):
        with pytest.raises(CheckpointError) as err:
            load(path)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and "--trust-checkpoint" in msg
        assert "os.makedirs" in msg or "posix.makedirs" in msg
        assert not marker.exists()
    read_checkpoint(path, trust=True)  # the explicit opt-in is a full pickle
    assert marker.is_dir()


def _damaged(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "zero_byte": b"", "text": b"not a checkpoint\n",
             "truncated_tail": data[:-10]}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.ckpt"
        out[name].write_bytes(content)
    out["list"] = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], out["list"])
    out["truncated_safetensors"] = tmp_path / "t.safetensors"
    out["truncated_safetensors"].write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    return out


def test_damaged_files_give_one_line_errors_in_every_script(tiny, tmp_path):
    _, _, good = tiny
    store = random_store(tmp_path / "store.h5", n=2, tile=16, n_slides=1)
    scripts = {
        "sample": lambda p: ["--ckpt", str(p), "--prompt", "x", "--device", "cpu",
                             "--outdir", str(tmp_path / "s")],
        "fid": lambda p: ["generate", "--ckpt", str(p), "--store", str(store), "--outdir",
                          str(tmp_path / "f"), "--device", "cpu"],
        "ckpt_tools": lambda p: ["inspect", str(p)],
        "eval_vae": lambda p: ["--data", str(tmp_path), "--config", str(p), "--device", "cpu"],
    }
    tried = 0
    for kind, path in _damaged(tmp_path, good).items():
        for name, argv in scripts.items():
            if name == "eval_vae" and path.suffix == ".safetensors":
                continue  # eval_vae reads a .safetensors --config as YAML, not as weights
            with pytest.raises(CheckpointError) as err:
                load_script(name).main(argv(path))
            msg = str(err.value)
            assert "\n" not in msg and str(path) in msg, (kind, name, msg)
            tried += 1
    assert tried == 23


def test_main_resume_from_a_damaged_checkpoint(tmp_path, capsys):
    """main.py -r stops with one line before building anything."""
    import main

    run = tmp_path / "logs" / "2024-01-01T00-00-00_tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "2024-01-01T00-00-00-project.yaml").write_text(
        "model: {target: torch.nn.Identity}\ndata: {target: torch.nn.Identity}\n")
    last = run / "checkpoints" / "last.ckpt"
    for content in (b"", b"PK\x03\x04 truncated zip"):
        last.write_bytes(content)
        assert main.main(["-r", str(run), "-t", "--accelerator", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(last) in err and "Traceback" not in err, err


def test_sample_cli_one_line_for_a_truncated_checkpoint(tiny, tmp_path):
    _, _, good = tiny
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "scripts/sample.py", "--ckpt", str(bad), "--prompt",
                           "x", "--device", "cpu", "--outdir", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in proc.stderr
    assert "full pickle" not in proc.stderr  # no silent retry as an unrestricted pickle


class _Boom:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_training_checkpoint_saves_are_atomic(tmp_path):
    """A save that fails midway leaves the previous last.ckpt and no temporary file."""
    from ldm.trainer_setup import atomic_checkpoint_io

    io = atomic_checkpoint_io()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "x": _Boom()}, target)
    assert read_checkpoint(target)["global_step"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


KILL_SCRIPT = """
import sys, torch
from ldm.trainer_setup import atomic_checkpoint_io
io = atomic_checkpoint_io()
for step in range(10**6):
    io.save_checkpoint({"state_dict": {"w": torch.full((4_000_000,), float(step))},
                        "global_step": step}, sys.argv[1])
"""


def test_sigkill_during_checkpoint_saves_leaves_a_loadable_last_ckpt(tmp_path):
    import signal
    import time

    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 120
        while not target.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # several 16 MB saves later, mid-write with high probability
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = read_checkpoint(target)
    step = float(ckpt["global_step"])
    assert torch.equal(ckpt["state_dict"]["w"], torch.full((4_000_000,), step))


def test_cas_and_inception_weights_use_the_same_loader(tmp_path):
    from ldm.evaluation.cas import resnet34
    from ldm.evaluation.fid import resolve_inception_state_dict

    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"PK\x03\x04 not a whole file")
    for load in (lambda: resnet34(weights=bad), lambda: resolve_inception_state_dict(bad)):
        with pytest.raises(CheckpointError) as err:
            load()
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
