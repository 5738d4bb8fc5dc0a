"""main.py: flags, pre-flight checks, a tiny CPU training run, exact resume and 2-process DDP."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tcga_store import random_store
from tiny_ldm import tiny_model_config

import main
from ldm.trainer_setup import (
    RUN_TIMESTAMP_ENV,
    ConfigError,
    Hardware,
    learning_rate,
    parse_gpus,
    resolve_hardware,
    resolve_run,
    trainer_kwargs,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, text_dir: Path, n_patches: int = 8, **trainer) -> Path:
    """A LatentDiffusion small enough to train on CPU in seconds (text-conditioned, with EMA)."""
    store = random_store(tmp_path / "train.h5", n=n_patches, tile=24, n_slides=2)
    model = tiny_model_config(text_dir, use_ema=True)
    model["params"]["monitor"] = "val/loss"
    model["params"]["scheduler_config"] = {
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {"warm_up_steps": [3], "cycle_lengths": [10**13], "f_start": [0.1],
                   "f_max": [1.0], "f_min": [1.0]}}
    model["params"]["unet_config"]["params"]["use_checkpoint"] = True
    cfg = {
        "model": model,
        "data": {"target": "ldm.data.tcga.TCGAPatchData",
                 "params": {"batch_size": 4, "num_workers": 0,
                            "train": {"path": str(store), "size": 16, "p_uncond": 0.25}}},
        "lightning": {
            "trainer": {"max_steps": 4, "log_every_n_steps": 1, "enable_progress_bar": False,
                        "num_sanity_val_steps": 0, "limit_val_batches": 0,
                        "enable_model_summary": False, **trainer},
            "modelcheckpoint": {"params": {"every_n_train_steps": 2}},
            "callbacks": {"image_logger": {"target": "ldm.callbacks.ImageLogger",
                                           "params": {"batch_frequency": 4, "max_images": 2,
                                                      "log_images_kwargs": {"ddim_steps": 2}}}},
        },
    }
    path = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


@pytest.fixture
def fixed_timestamp(monkeypatch):
    monkeypatch.setenv(RUN_TIMESTAMP_ENV, "2024-01-02T03-04-05")
    return "2024-01-02T03-04-05"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------ --gpus and devices
@pytest.mark.parametrize("spec, indices", [
    ("0,1,2", [0, 1, 2]), ("0,", [0]), ("3,1", [3, 1]), (" 0, 1 ", [0, 1]), ("7,", [7]),
])
def test_gpus_are_device_indices(spec, indices):
    assert parse_gpus(spec) == indices
    hw = resolve_hardware(spec, None, None, None, None, {})
    assert (hw.accelerator, hw.devices, hw.world_size) == ("gpu", indices, len(indices))
    assert hw.precision in ("bf16-mixed", "16-mixed")


@pytest.mark.parametrize("spec, message", [
    ("2", "--devices 2"), ("0", "ambiguous"), ("-1", "ambiguous"), ("a,b", "device indices"),
    ("0,0", "repeat"), ("", "device indices"), (",", "device indices"),
])
def test_gpus_rejects_counts_and_garbage(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_gpus(spec)


def test_hardware_resolution_table():
    cpu2 = resolve_hardware(None, "2", "cpu", None, None, {})
    assert (cpu2.accelerator, cpu2.devices, cpu2.precision, cpu2.world_size) == (
        "cpu", 2, "32-true", 2)
    nodes = resolve_hardware("0,1", None, None, 4, "16-mixed", {})
    assert (nodes.world_size, nodes.precision) == (8, "16-mixed")
    from_cfg = resolve_hardware(None, None, None, None, None,
                                {"accelerator": "cpu", "devices": 3, "precision": "bf16-mixed"})
    assert (from_cfg.accelerator, from_cfg.devices, from_cfg.precision) == (
        "cpu", 3, "bf16-mixed")
    default = resolve_hardware(None, None, None, None, None, {})
    assert default.devices == 1
    assert default.accelerator == ("gpu" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not both"):
        resolve_hardware("0,1", "2", None, None, None, {})
    with pytest.raises(ConfigError, match="lightning.trainer.gpus"):
        resolve_hardware(None, None, None, None, None, {"gpus": "0,1"})
    with pytest.raises(ConfigError, match="--accelerator is cpu"):
        resolve_hardware("0,", None, "cpu", None, None, {})


def test_ddp_strategy_only_for_several_devices():
    from pytorch_lightning.strategies import DDPStrategy

    one = trainer_kwargs({"max_steps": 3}, Hardware("cpu", 1, 1, "32-true"))
    assert one["strategy"] == "auto" and one["max_steps"] == 3
    two = trainer_kwargs({}, Hardware("gpu", [0, 1, 2], 1, "bf16-mixed"))
    assert isinstance(two["strategy"], DDPStrategy)
    assert two["strategy"]._ddp_kwargs.get("find_unused_parameters") is False
    assert (two["devices"], two["precision"]) == ([0, 1, 2], "bf16-mixed")
    assert trainer_kwargs({"strategy": "fsdp"}, Hardware("gpu", 2, 1, "32"))["strategy"] == "fsdp"


def test_scale_lr_uses_world_size_accumulation_and_batch():
    hw = Hardware("gpu", [0, 1, 2], 2, "bf16-mixed")
    assert learning_rate(2.5e-5, False, 64, 4, hw) == 2.5e-5
    assert learning_rate(2.5e-5, True, 64, 4, hw) == pytest.approx(4 * 2 * 3 * 64 * 2.5e-5)


def test_run_directory_name_comes_from_the_shared_timestamp(fixed_timestamp, tmp_path):
    run = resolve_run(["configs/pathldm.yaml", "configs/ablations/paper_hparams.yaml"], None,
                      None, "", str(tmp_path))
    assert run.logdir == tmp_path / f"{fixed_timestamp}_pathldm+paper_hparams"
    assert os.environ[RUN_TIMESTAMP_ENV] == fixed_timestamp
    named = resolve_run(["a.yaml"], None, "my run", "-v2", "logs")
    assert named.logdir.name == f"{fixed_timestamp}_my-run-v2"


# ------------------------------------------------------------------------ fail fast
def test_pathldm_without_weights_or_gpus_fails_fast():
    """The README command on a machine without weights, data and GPUs: one clear message."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "main.py", "--base", "configs/pathldm.yaml", "-t",
                           "--gpus", "0,1,2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    expected = ["model.params.unet_config.params.ckpt_path: models/ldm/cin256-v2/model.ckpt",
                "model.params.first_stage_config.params.ckpt_path",
                "model.params.cond_stage_config.params.version: vinid/plip",
                "data.params.train.path: data/tcga_brca/train.h5",
                "data.params.validation.path"]
    positions = [err.index(e) for e in expected]  # weights first, then data
    if torch.cuda.device_count() < 3:
        positions.append(err.index("--gpus 0,1,2 asks for CUDA device(s) 0, 1, 2"))
    assert positions == sorted(positions)
    lines = {line.split(":")[0].strip(" -"): line for line in err.splitlines()}
    assert "nitro/cin/model.ckpt" in lines["model.params.unet_config.params.ckpt_path"]
    assert "vq_f4_finetune.yaml" in lines["model.params.first_stage_config.params.ckpt_path"]
    assert "data_prep.build_dataset" in lines["data.params.train.path"]
    assert "data_prep.build_dataset" in lines["data.params.validation.path"]
    assert time.time() - start < 60


def test_cli_errors_exit_nonzero(tmp_path, capsys, fixed_timestamp, tiny_clip_dir):
    cfg = str(tiny_config(tmp_path, tiny_clip_dir))
    cases = [
        (["--base", cfg], "nothing to do"),
        (["--base", cfg, "-t", "--gpus", "2"], "--devices 2"),
        (["--base", str(tmp_path / "nope.yaml"), "-t"], "nope.yaml does not exist"),
        (["--base", cfg, "-t", "oops"], "key=value"),
        (["-r", str(tmp_path / "no_run"), "-t"], "no_run does not exist"),
        (["-r", str(tmp_path), "-n", "x", "-t"], "cannot be used with -r"),
        (["--base", cfg, "-t", "--accelerator", "cpu",
          "data.params.train.path=/no/such/train.h5"], "data.params.train.path: /no/such"),
        (["--base", cfg, "-t", "--accelerator", "cpu", "lightning.trainer.no_such_arg=1"],
         "no_such_arg"),
    ]
    for argv, message in cases:
        assert main.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


# ------------------------------------------------------------------------ training runs
def test_tiny_training_run_writes_the_run_directory(tmp_path, fixed_timestamp, tiny_clip_dir):
    cfg = tiny_config(tmp_path, tiny_clip_dir)
    logs = tmp_path / "logs"
    assert main.main(["--base", str(cfg), "-t", "--accelerator", "cpu", "-l", str(logs),
                      "data.params.train.p_uncond=0.0"]) == 0
    run = logs / f"{fixed_timestamp}_tiny"
    assert sorted(p.name for p in (run / "configs").iterdir()) == [
        f"{fixed_timestamp}-lightning.yaml", f"{fixed_timestamp}-project.yaml"]
    project = OmegaConf.load(run / "configs" / f"{fixed_timestamp}-project.yaml")
    assert set(project) == {"model", "data"} and project.data.params.train.p_uncond == 0.0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch=000000-step=000000002.ckpt", "epoch=000001-step=000000004.ckpt",
                     "last.ckpt"]
    last = _load(run / "checkpoints" / "last.ckpt")  # loads with weights_only=True
    assert last["global_step"] == 4
    assert set(last["config"]) == {"model", "data", "lightning"}
    assert isinstance(last["config"]["model"], dict)
    assert last["config"]["lightning"]["run"]["precision"] == "32-true"
    assert any(k.startswith("model_ema.") for k in last["state_dict"])
    from ldm.util import instantiate_from_config

    rebuilt = instantiate_from_config(last["config"]["model"])
    rebuilt.load_state_dict(last["state_dict"], strict=True)
    images = sorted(p.name for p in (run / "images" / "train").iterdir())
    for key in ("inputs", "reconstruction", "samples"):
        assert f"{key}_gs-000004_e-000001_b-000001.png" in images
    captions = (run / "images" / "train" / "captions_gs-000004_e-000001_b-000001.txt").read_text()
    lines = captions.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{i}\t") for i, line in enumerate(lines))
    assert all(" til; slide " in line for line in lines)  # p_uncond=0: no empty caption
    metrics = (run / "csv" / fixed_timestamp / "metrics.csv").read_text()
    assert "train/loss_step" in metrics and "lr-AdamW" in metrics
    assert any((run / "tensorboard" / fixed_timestamp).glob("events.out.tfevents.*"))
    # --test alone evaluates the resumed checkpoint (LatentDiffusion: its validation step)
    store = OmegaConf.load(cfg).data.params.train.path
    assert main.main(["-r", str(run), "--test", "--accelerator", "cpu",
                      f"data.params.validation.path={store}", "data.params.validation.size=16",
                      "lightning.trainer.limit_val_batches=1"]) == 0
    assert "val/loss_ema" in (run / "csv" / fixed_timestamp / "metrics.csv").read_text()


def _losses(run: Path) -> dict[int, str]:
    """``train/loss_step`` by step from every session's CSV log of a run directory."""
    import csv

    out = {}
    for path in sorted((run / "csv").glob("*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss_step"):
                    out[int(row["step"])] = row["train/loss_step"]
    return out


def test_resume_from_last_ckpt_reaches_identical_parameters(tmp_path, fixed_timestamp,
                                                            tiny_clip_dir, monkeypatch):
    """6 uninterrupted steps == stop mid-epoch at 2, resume, stop mid-epoch at 5, resume to 6.

    Epochs of 4 batches with random crops, flips and caption dropout: the resumed runs must see
    the same samples with the same random choices and the same diffusion noise. The run uses a
    non-default seed (-s 7) that the resumed sessions are not given: they must take it from the
    checkpoint. Losses and weights are compared exactly.
    """
    cfg = tiny_config(tmp_path, tiny_clip_dir, n_patches=16)
    common = ["--base", str(cfg), "-t", "--accelerator", "cpu", "-s", "7",
              "lightning.callbacks.image_logger.params.disabled=true",
              "lightning.modelcheckpoint.params.every_n_train_steps=3"]
    assert main.main([*common, "-l", str(tmp_path / "a"), "lightning.trainer.max_steps=6"]) == 0
    assert main.main([*common, "-l", str(tmp_path / "b"), "lightning.trainer.max_steps=2"]) == 0
    run_b = tmp_path / "b" / f"{fixed_timestamp}_tiny"
    last_b = run_b / "checkpoints" / "last.ckpt"
    assert _load(last_b)["global_step"] == 2
    assert _load(last_b)["TCGAPatchData"] == {"epoch": 0, "batches": 2}
    for steps in (5, 6):
        monkeypatch.setenv(RUN_TIMESTAMP_ENV, f"2024-01-02T03-05-0{steps}")  # own CSV log
        assert main.main(["-r", str(run_b), "-t", "--accelerator", "cpu",
                          f"lightning.trainer.max_steps={steps}"]) == 0
    run_a = tmp_path / "a" / f"{fixed_timestamp}_tiny"
    a = _load(run_a / "checkpoints" / "last.ckpt")
    b = _load(last_b)
    assert a["config"]["lightning"]["run"]["seed"] == b["config"]["lightning"]["run"]["seed"] == 7
    losses_a, losses_b = _losses(run_a), _losses(run_b)
    assert len(losses_a) == 6 and losses_a == losses_b
    assert a["global_step"] == b["global_step"] == 6
    assert a["TCGAPatchData"] == b["TCGAPatchData"] == {"epoch": 1, "batches": 2}
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # U-Net, EMA shadow and num_updates
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(),
                      b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    # main.py's checkpoints need nothing beyond torch's weights-only defaults
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last_b) == []


def test_ddp_two_cpu_processes(tmp_path, tiny_clip_dir):
    """Lightning DDP (gloo) with 2 processes: one run directory, training completes."""
    cfg = tiny_config(tmp_path, tiny_clip_dir, n_patches=8)
    logs = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k != RUN_TIMESTAMP_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "main.py", "--base", str(cfg), "-t", "--accelerator",
                           "cpu", "--devices", "2", "-l", str(logs),
                           "lightning.trainer.max_steps=2",
                           "lightning.callbacks.image_logger.params.batch_frequency=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(logs.iterdir())
    assert len(runs) == 1, runs
    ckpt = _load(runs[0] / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert ckpt["config"]["lightning"]["run"]["world_size"] == 2
    # 8 patches sharded over 2 ranks in batches of 4: one batch per epoch, so 2 steps = 2 epochs
    assert ckpt["TCGAPatchData"] == {"epoch": 2, "batches": 0}
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert any((runs[0] / "images" / "train").glob("samples_gs-000002_*.png"))
