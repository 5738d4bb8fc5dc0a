#!/usr/bin/env python
"""Train PathLDM (CompVis latent diffusion) models with PyTorch Lightning 2.

Examples:
  python main.py --base configs/pathldm.yaml -t --gpus 0,1,2
  python main.py --base configs/pathldm.yaml configs/ablations/paper_hparams.yaml -t --gpus 0,1,2
  python main.py --base configs/demo/ldm_tiny.yaml -t --accelerator cpu data.params.batch_size=4
  python main.py -r logs/2024-01-01T00-00-00_pathldm -t --gpus 0,1,2      # resume exactly
  torchrun --nproc_per_node 4 main.py --base configs/pathldm.yaml -t --devices 4

A run writes logs/<timestamp>_<name>/{configs,checkpoints,images,tensorboard,csv}. Settings after
the flags are OmegaConf overrides: key=value (e.g. data.params.batch_size=32).

Resuming restores the model, EMA, optimizer, LR scheduler, step, RNG states and the position in
the training data (TCGAPatchData), so a run resumed from any checkpoint, mid-epoch included,
continues exactly as an uninterrupted one would (on deterministic kernels).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.argtypes import positive_int, seed_int
from ldm.callbacks import ImageLogger  # noqa: F401  (CompVis configs name main.ImageLogger)
from ldm.config_check import config_problems
from ldm.trainer_setup import (
    DEFAULT_SEED,
    ConfigError,
    Hardware,
    RunPaths,
    atomic_checkpoint_io,
    device_problems,
    format_problems,
    hand_accumulation_to_model,
    learning_rate,
    load_config,
    path_problems,
    resolve_hardware,
    resolve_run,
    resume_checkpoint_seed,
    run_seed,
    scale_lr_setting,
    trainer_kwargs,
)

logger = logging.getLogger("main")


def get_parser() -> argparse.ArgumentParser:
    """Command-line flags (CompVis names, Lightning 2 semantics)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--base", nargs="*", metavar="CONFIG.yaml", default=[],
                   help="configs merged left to right (later files override earlier ones)")
    p.add_argument("-t", "--train", action="store_true", help="train")
    p.add_argument("--test", action="store_true",
                   help="after training (or alone, with -r): the model's test step on "
                        "data.params.test, or its validation step if it has none")
    p.add_argument("--no-test", action="store_true",
                   help="accepted for CompVis compatibility; no test runs unless --test is given")
    p.add_argument("-r", "--resume", metavar="LOGDIR|CKPT",
                   help="resume a run directory (from checkpoints/last.ckpt) or a checkpoint: "
                        "model, optimizer, scheduler, EMA and step are restored")
    p.add_argument("-n", "--name", help="run name (default: the config file names)")
    p.add_argument("-f", "--postfix", default="", help="appended to the run name")
    p.add_argument("-l", "--logdir", default="logs", help="directory that holds run directories")
    p.add_argument("-s", "--seed", type=seed_int, default=None,
                   help=f"global seed (default {DEFAULT_SEED}; -r keeps the resumed run's seed)")
    p.add_argument("--gpus", metavar="IDS",
                   help="CUDA device indices, e.g. 0,1,2 (or 0, for one device); a bare count "
                        "is refused as ambiguous: use --devices N")
    p.add_argument("--devices", help="number of devices (or indices, or 'auto') for "
                                     "--accelerator; default 1")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu", "cuda", "mps"],
                   help="default: GPU when CUDA is available, else CPU")
    p.add_argument("--num_nodes", type=positive_int,
                   help="number of nodes (SLURM/torchrun multi-node)")
    p.add_argument("--precision", help="Lightning precision; default bf16-mixed on GPU "
                                       "(16-mixed where bf16 is unsupported), 32-true on CPU")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoints (-r, ckpt_path) that a weights-only load refuses as "
                        "full pickles; this can run arbitrary code: only for files you trust")
    p.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=None,
                   help="lr = accumulate_grad_batches * nodes * devices * batch * "
                        "base_learning_rate (--no-scale_lr: lr = base_learning_rate); default: "
                        "the config's model.scale_lr (on in the autoencoder configs), else off")
    return p


def _callbacks(config: DictConfig, lightning_cfg: DictConfig, run: RunPaths, seed: int,
               saved_lightning: dict[str, Any], with_loggers: bool) -> list:
    """Run-directory, checkpoint, RNG and user-configured callbacks."""
    from ldm.callbacks import CheckpointConfig, RNGStateCallback, SetupCallback, StepCheckpoint
    from ldm.util import instantiate_from_config

    project = {"model": config.model, "data": config.data}
    full = {**project, "lightning": saved_lightning}
    callbacks = [
        SetupCallback(run.now, str(run.logdir), str(run.ckptdir), str(run.cfgdir), project,
                      saved_lightning, resume=run.resume_ckpt is not None),
        CheckpointConfig(full),
        RNGStateCallback(seed),
    ]
    ckpt = OmegaConf.create({"dirpath": str(run.ckptdir), "filename": "{epoch:06}-{step:09}",
                             "every_n_train_steps": 5000, "save_top_k": -1, "save_last": True,
                             "enable_version_counter": False, "verbose": True})
    ckpt = OmegaConf.merge(ckpt, lightning_cfg.get("modelcheckpoint", {}).get("params", {}))
    callbacks.append(StepCheckpoint(**OmegaConf.to_container(ckpt, resolve=True)))
    user = OmegaConf.merge(
        {"image_logger": {"target": "ldm.callbacks.ImageLogger",
                          "params": {"batch_frequency": 1000, "max_images": 8}}},
        {"learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                  "params": {"logging_interval": "step"}}} if with_loggers else {},
        lightning_cfg.get("callbacks", {}))
    callbacks += [instantiate_from_config(cfg) for cfg in user.values() if cfg is not None]
    return callbacks


def _loggers(lightning_cfg: DictConfig, run: RunPaths) -> list:
    """TensorBoard and CSV loggers (one version folder per session); configurable/removable."""
    from ldm.util import instantiate_from_config

    defaults = {name: {"target": f"pytorch_lightning.loggers.{cls}",
                       "params": {"save_dir": str(run.logdir), "name": name, "version": run.now}}
                for name, cls in (("tensorboard", "TensorBoardLogger"), ("csv", "CSVLogger"))}
    cfg = OmegaConf.merge(defaults, lightning_cfg.get("loggers", {}))
    return [instantiate_from_config(c) for c in cfg.values() if c is not None]


def _build_trainer(config: DictConfig, lightning_cfg: DictConfig, hw: Hardware, run: RunPaths,
                   seed: int, saved_lightning: dict[str, Any]):
    import pytorch_lightning as pl

    kwargs = trainer_kwargs(OmegaConf.to_container(lightning_cfg.get("trainer", {}),
                                                   resolve=True), hw)
    loggers = _loggers(lightning_cfg, run)
    kwargs.setdefault("plugins", [atomic_checkpoint_io()])
    kwargs.update(logger=loggers or False, default_root_dir=str(run.logdir),
                  callbacks=_callbacks(config, lightning_cfg, run, seed, saved_lightning,
                                       bool(loggers)))
    try:
        return pl.Trainer(**kwargs)
    except TypeError as e:
        raise ConfigError(f"lightning.trainer: {e}") from e


def _preflight(config: DictConfig, hw: Hardware, argv: Sequence[str] | None) -> None:
    """Fail before building anything heavy: missing weights/data first, then devices."""
    problems = path_problems(config) + device_problems(hw)
    if problems:
        raise ConfigError(format_problems(problems))
    if hw.world_size > 1 and argv is not None and list(argv) != sys.argv[1:]:
        raise ConfigError("multi-device runs re-launch this script for every rank: start them "
                          "from the command line (python main.py ... or torchrun main.py ...)")


def _seed(explicit: int | None, run_paths: RunPaths, previous: Any) -> int:
    """The session's seed: ``-s``, else the resumed checkpoint's (or run's), else the default.

    Reading the resumed checkpoint also checks it: a damaged or refused file stops here.
    """
    saved = None
    if run_paths.resume_ckpt is not None:
        saved = resume_checkpoint_seed(run_paths.resume_ckpt)
        if saved is None and previous is not None:
            saved = previous.get("seed")
    return run_seed(explicit, saved)


def run(opt: argparse.Namespace, overrides: Sequence[str],
        argv: Sequence[str] | None = None) -> int:
    """Resolve the run, check it, build model/data/trainer, fit and optionally test."""
    from ldm.checkpoint import safe_globals, set_trust

    set_trust(opt.trust_checkpoint)
    run_paths = resolve_run(opt.base, opt.resume, opt.name, opt.postfix, opt.logdir)
    files = [*run_paths.resumed_configs, *opt.base]
    config = load_config(files, overrides)
    problems = config_problems(config, files, overrides)  # before anything is built
    if problems:
        raise ConfigError(format_problems(problems))
    lightning_cfg = config.pop("lightning", OmegaConf.create())
    previous = lightning_cfg.pop("run", None)  # record of the previous session
    opt.seed = _seed(opt.seed, run_paths, previous)
    trainer_cfg = lightning_cfg.get("trainer", {})
    hw = resolve_hardware(opt.gpus, opt.devices, opt.accelerator, opt.num_nodes, opt.precision,
                          trainer_cfg)
    _preflight(config, hw, argv)

    import pytorch_lightning as pl
    from pytorch_lightning.utilities.model_helpers import is_overridden

    from ldm.util import instantiate_from_config

    pl.seed_everything(opt.seed, workers=True)
    batch_size = int(config.data.params.get("batch_size", 1))
    base_lr = float(config.model.get("base_learning_rate", 1.0e-4))
    scale, source = scale_lr_setting(opt.scale_lr, config.model)
    lr = learning_rate(base_lr, scale, batch_size,
                       int(trainer_cfg.get("accumulate_grad_batches", 1)), hw, source)
    saved_lightning = OmegaConf.to_container(lightning_cfg, resolve=True)
    saved_lightning["run"] = {
        "accelerator": hw.accelerator, "devices": hw.devices, "num_nodes": hw.num_nodes,
        "precision": hw.precision, "world_size": hw.world_size, "learning_rate": lr,
        "scale_lr": scale,
        "seed": opt.seed, "argv": list(argv if argv is not None else sys.argv[1:])}
    model = instantiate_from_config(config.model, learning_rate=lr)
    if "trainer" in lightning_cfg:
        hand_accumulation_to_model(model, lightning_cfg.trainer)
    data = instantiate_from_config(config.data)
    if is_overridden("load_state_dict", data, pl.LightningDataModule):
        # the datamodule checkpoints its position in the epoch, so Lightning's warning about
        # resuming mid-epoch with a non-resumable dataloader does not apply
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended "
                                "before the epoch ended")
    trainer = _build_trainer(config, lightning_cfg, hw, run_paths, opt.seed, saved_lightning)
    logger.info("run directory %s; %s x%d on %d node(s), precision %s", run_paths.logdir,
                hw.accelerator, hw.devices_per_node, hw.num_nodes, hw.precision)
    weights_only = not opt.trust_checkpoint
    with safe_globals():
        return _fit_and_test(opt, trainer, model, data, run_paths.resume_ckpt, weights_only)


def _fit_and_test(opt: argparse.Namespace, trainer: Any, model: Any, data: Any,
                  resume_ckpt: Any, weights_only: bool) -> int:
    """``trainer.fit`` and/or the test (or validation) step; the exit status."""
    from pytorch_lightning.utilities.model_helpers import is_overridden

    if opt.train:
        trainer.fit(model, datamodule=data, ckpt_path=resume_ckpt, weights_only=weights_only)
        if trainer.interrupted:
            logger.warning("training was interrupted")
            return 130
    if opt.test:
        ckpt = None if opt.train else resume_ckpt
        if is_overridden("test_step", model):
            trainer.test(model, datamodule=data, ckpt_path=ckpt, weights_only=weights_only)
        else:
            logger.info("the model has no test_step; evaluating its validation step instead")
            trainer.validate(model, datamodule=data, ckpt_path=ckpt, weights_only=weights_only)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opt, overrides = get_parser().parse_known_args(argv)
    if not (opt.train or opt.test):
        print("main.py: nothing to do: pass -t/--train to train and/or --test to evaluate",
              file=sys.stderr)
        return 2
    from ldm.checkpoint import CheckpointError

    try:
        return run(opt, overrides, argv)
    except (ConfigError, CheckpointError) as e:
        print(f"main.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
