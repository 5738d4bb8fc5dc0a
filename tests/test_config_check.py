"""main.py checks configs and overrides against the constructors before building anything."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf
from tcga_store import random_store
from tiny_ldm import tiny_model_config

import main
from ldm.config import merge_configs
from ldm.config_check import config_problems
from ldm.data.tcga import REQUIRED_DATASETS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_passes(path):
    cfg = OmegaConf.load(path)
    files = [path] if "target" in cfg.get("model", {}) else [ROOT / "configs" / "pathldm.yaml",
                                                            path]
    merged = merge_configs(*[OmegaConf.load(f) for f in files])  # as main.py merges them
    assert config_problems(merged, files, []) == []


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> Path:
    """A class-conditional tiny LDM config (kwargs chains: LatentDiffusion, VQModelInterface),
    with an interpolation, on a real store."""
    tmp = tmp_path_factory.mktemp("cfg")
    store = random_store(tmp / "train.h5", n=4, tile=16, n_slides=1)
    model = tiny_model_config(None, use_ema=True)
    model["params"]["unet_config"]["params"]["image_size"] = "${model.params.image_size}"
    cfg = {"model": model,
           "data": {"target": "ldm.data.tcga.TCGAPatchData",
                    "params": {"batch_size": 2, "train": {"path": str(store), "size": 16}}},
           "lightning": {"trainer": {"max_steps": 1},
                         "callbacks": {"image_logger": {"target": "ldm.callbacks.ImageLogger",
                                                        "params": {"batch_frequency": 5}}}}}
    path = tmp / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def test_the_tiny_config_with_interpolation_and_kwargs_chains_passes(tiny_cfg):
    assert config_problems(OmegaConf.load(tiny_cfg), [tiny_cfg], []) == []


BAD_OVERRIDES = [
    ("model.base_learing_rate=1.0", "model.base_learing_rate", "'base_learning_rate'"),
    ("model.params.unet_config.params.num_res_block=2", "num_res_block", "'num_res_blocks'"),
    ("model.params.use_emma=true", "model.params.use_emma", "'use_ema'"),  # **kwargs -> DDPM
    ("model.params.first_stage_config.params.n_embeds=8", "n_embeds", "'n_embed'"),  # VQModel
    ("data.params.batchsize=4", "data.params.batchsize", "'batch_size'"),
    ("data.params.train.sise=8", "data.params.train.sise", "'size'"),
    ("data.params.batch_size=sixteen", "data.params.batch_size", "'sixteen' is not an integer"),
    ("model.params.unet_config.params.model_channels='32'", "model_channels", "'32' is not an"),
    ("model.params.use_ema=maybe", "model.params.use_ema", "'maybe' is not true or false"),
    ("lightning.trainer.max_step=3", "lightning.trainer.max_step", "'max_steps'"),
    ("lightning.logger.name=x", "lightning.logger", "'loggers'"),
    ("lightning.callbacks.image_logger.params.batch_frequenzy=3", "batch_frequenzy",
     "'batch_frequency'"),
    ("model.params.scale_factor=${nope}", "cannot resolve", "nope"),
    ("model.base_learning_rate=-1", "model.base_learning_rate", "not a positive number"),
    ("modell.x=1", "modell", "'model'"),
]


@pytest.mark.parametrize("override, key, hint", BAD_OVERRIDES, ids=[b[1] for b in BAD_OVERRIDES])
def test_bad_overrides_give_one_line(tiny_cfg, tmp_path, capsys, override, key, hint):
    argv = ["--base", str(tiny_cfg), "-t", "--accelerator", "cpu", "-l", str(tmp_path), override]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert key in err and hint in err, err
    if "cannot resolve" not in err:
        assert "(command line)" in err
    assert not any(tmp_path.iterdir())  # nothing was built or written


def test_a_typo_in_a_config_file_names_the_file(tiny_cfg, tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  params:\n    cond_stage_config:\n      params:\n"
                       "        n_clases: 5\n")
    assert main.main(["--base", str(tiny_cfg), str(overlay), "-t", "--accelerator", "cpu",
                      "-l", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert f"({overlay})" in err and "'n_classes'" in err and "ClassEmbedder" in err


@pytest.mark.parametrize("kind", ["empty", "not_training", "not_hdf5"])
def test_empty_or_foreign_store_as_training_data(tiny_cfg, tmp_path, capsys, kind):
    store = tmp_path / f"{kind}.h5"
    if kind == "empty":
        with h5py.File(store, "w") as f:  # what an empty build leaves: every dataset, no rows
            for name in REQUIRED_DATASETS:
                f.create_dataset(name, shape=(0,), dtype="f4")
    elif kind == "not_training":
        with h5py.File(store, "w") as f:
            f.create_dataset("latents", data=np.zeros((2, 3)))
    else:
        store.write_text("not hdf5")
    argv = ["--base", str(tiny_cfg), "-t", "--accelerator", "cpu", "-l", str(tmp_path / "logs"),
            f"data.params.train.path={store}"]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.params.train.path (command line)" in err, err
    assert str(store) in err
    assert {"empty": "empty store (0 patches)", "not_training": "not a training store",
            "not_hdf5": "not a readable HDF5 store"}[kind] in err
