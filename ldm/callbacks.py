"""Callbacks of ``main.py``: run directory, config and RNG state in checkpoints, image grids."""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

logger = logging.getLogger(__name__)


class SetupCallback(Callback):
    """Create the run directory and write the merged configs, on global rank 0 only.

    ``config`` holds ``model`` and ``data``; ``lightning_config`` the ``lightning`` section. The
    run directory of rank 0 is broadcast so that every rank agrees on it even when ranks were
    started separately (torchrun, SLURM) and computed different timestamps.
    """

    def __init__(self, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Mapping,
                 lightning_config: Mapping, resume: bool = False) -> None:
        super().__init__()
        self.now = now
        self.logdir, self.ckptdir, self.cfgdir = logdir, ckptdir, cfgdir
        self.config = config
        self.lightning_config = lightning_config
        self.resume = resume

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logdir = trainer.strategy.broadcast(self.logdir)
        if logdir != self.logdir:
            logger.info("rank %d uses rank 0's run directory %s", trainer.global_rank, logdir)
            self.ckptdir = str(Path(logdir) / Path(self.ckptdir).name)
            self.cfgdir = str(Path(logdir) / Path(self.cfgdir).name)
            self.logdir = logdir
        if not trainer.is_global_zero:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir, str(Path(self.logdir) / "images")):
            Path(d).mkdir(parents=True, exist_ok=True)
        project = Path(self.cfgdir) / f"{self.now}-project.yaml"
        lightning = Path(self.cfgdir) / f"{self.now}-lightning.yaml"
        OmegaConf.save(OmegaConf.create(dict(self.config)), project)
        OmegaConf.save(OmegaConf.create({"lightning": dict(self.lightning_config)}), lightning)
        logger.info("run directory %s (%s); configs: %s, %s", self.logdir,
                    "resumed" if self.resume else "new", project.name, lightning.name)


class CheckpointConfig(Callback):
    """Store the resolved config in every checkpoint as plain data (``checkpoint["config"]``).

    Sections ``model``, ``data`` and ``lightning`` let a checkpoint alone rebuild its model.
    """

    def __init__(self, config: Mapping) -> None:
        super().__init__()
        self.config = OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = self.config


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves at the final step, so no trained step is lost.

    Lightning's saves every ``every_n_train_steps`` only; a run that reaches ``max_steps`` in
    between is saved right after its last batch (a state Lightning resumes exactly), and a run
    ending otherwise (``max_epochs``) refreshes ``last.ckpt`` when training ends. Only public
    Lightning API: whether a checkpoint was written at a step is seen through
    ``on_save_checkpoint``, files are written with ``Trainer.save_checkpoint`` under the names
    ``format_checkpoint_name`` gives. The final step's own file is kept only without a
    ``monitor`` (with one, ranking it would be Lightning's top-k bookkeeping); ``last.ckpt``
    always is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step_saved: int | None = None  # global step of the newest checkpoint written
        self._start_step = 0

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        self._step_saved = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step and self._unsaved(trainer):
            if self.monitor is None and self.save_top_k != 0:
                self._write(trainer, None)
            if self.save_last:
                self._write(trainer, self.CHECKPOINT_NAME_LAST)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # replaces ModelCheckpoint's, which tells "saved" apart by a private attribute
        if self.save_last and self._unsaved(trainer) and trainer.global_step > self._start_step:
            self._write(trainer, self.CHECKPOINT_NAME_LAST)

    def _unsaved(self, trainer: pl.Trainer) -> bool:
        """True during fitting (not a sanity check or fast_dev_run) with this step not saved."""
        return (trainer.state.fn == "fit" and not trainer.sanity_checking
                and not trainer.fast_dev_run and self._step_saved != trainer.global_step)

    def _write(self, trainer: pl.Trainer, filename: str | None) -> None:
        """Save the current state under ``filename`` (``None``: the step's own name)."""
        metrics = {**trainer.callback_metrics, "epoch": torch.tensor(trainer.current_epoch),
                   "step": torch.tensor(trainer.global_step)}
        path = self.format_checkpoint_name(metrics, filename=filename)
        if filename == self.CHECKPOINT_NAME_LAST:
            self.last_model_path = path  # before saving: it is part of the saved state
        trainer.save_checkpoint(path, weights_only=self.save_weights_only)
        if self.verbose and trainer.is_global_zero:
            logger.info("step %d: saved %s", trainer.global_step, path)


def _seed_all(seed: int) -> None:
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RNGStateCallback(Callback):
    """Per-rank RNG streams, saved in checkpoints so that a resumed run continues them exactly.

    Lightning seeds every rank identically; diffusion noise and timesteps should differ between
    ranks, so at setup each rank reseeds with ``seed + global_rank``. Checkpoints hold rank 0's
    states (python, numpy, torch, CUDA). A restored state is applied at ``on_train_start``, after
    Lightning has created the resumed data iterator (which draws a base seed from the torch RNG,
    a draw the uninterrupted run made before the checkpoint); other ranks then derive their own
    deterministic stream from it.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = int(seed)
        self._restored: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _seed_all(self.seed + trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        # tensors and plain containers only, so checkpoints load with weights_only=True
        version, py_state, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": [version, torch.tensor(py_state, dtype=torch.int64), gauss],
                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                           int(has_gauss), float(cached)],
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(int(v) for v in py_state.tolist()), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        if trainer.global_rank > 0:
            _seed_all(int(torch.randint(0, 2**31, ())) + trainer.global_rank)


def _to_uint8_grid(images: torch.Tensor, clamp: bool, nrow: int) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(H', W', C)`` uint8 grid."""
    images = images.detach().float().cpu()
    if clamp:
        images = images.clamp(-1.0, 1.0)
    grid = torchvision.utils.make_grid((images + 1.0) / 2.0, nrow=nrow, padding=2)
    return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class ImageLogger(Callback):
    """Every ``batch_frequency`` steps write the model's ``log_images`` as PNG grids.

    Files go to ``<logdir>/images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png``; captions
    (when the model returns ``"captions"``) to a ``captions_...txt`` next to them, one per image,
    in grid order. The grids also go to TensorBoard. Runs on global rank 0 only.
    """

    def __init__(self, batch_frequency: int = 1000, max_images: int = 8, clamp: bool = True,
                 increase_log_steps: bool = False, log_first_step: bool = False,
                 log_validation: bool = True, disabled: bool = False,
                 log_images_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if batch_frequency < 1:
            raise ValueError(f"batch_frequency must be positive, got {batch_frequency}")
        self.batch_frequency = int(batch_frequency)
        self.max_images = int(max_images)
        self.clamp = clamp
        self.log_steps = ({2**n for n in range(int(math.log2(self.batch_frequency)) + 1)}
                          if increase_log_steps else set())
        self.log_first_step = log_first_step
        self.log_validation = log_validation
        self.disabled = disabled
        self.log_images_kwargs = dict(log_images_kwargs or {})

    def check_frequency(self, step: int) -> bool:
        """True when images are due at ``step`` (optimizer steps done)."""
        if step == 0:
            return self.log_first_step
        return step % self.batch_frequency == 0 or step in self.log_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.disabled or not trainer.is_global_zero or not self.check_frequency(step):
            return
        self.log_img(trainer, pl_module, batch, batch_idx, "train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if (self.disabled or not self.log_validation or trainer.sanity_checking
                or batch_idx != 0 or not trainer.is_global_zero):
            return
        self.log_img(trainer, pl_module, batch, batch_idx, "val")

    @torch.no_grad()
    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                batch_idx: int, split: str) -> list[Path]:
        """Render and save the model's image logs; returns the written PNG paths."""
        if not callable(getattr(pl_module, "log_images", None)):
            return []
        was_training = pl_module.training
        pl_module.eval()
        try:
            logs = pl_module.log_images(batch, N=self.max_images, **self.log_images_kwargs)
        finally:
            pl_module.train(was_training)
        # not trainer.log_dir: it broadcasts, and only rank 0 gets here
        root = Path(trainer.default_root_dir)
        for cb in trainer.callbacks:
            if isinstance(cb, SetupCallback):
                root = Path(cb.logdir)
        outdir = root / "images" / split
        outdir.mkdir(parents=True, exist_ok=True)
        stem = f"gs-{trainer.global_step:06}_e-{trainer.current_epoch:06}_b-{batch_idx:06}"
        written = []
        for key, value in logs.items():
            if not torch.is_tensor(value) or value.dim() not in (3, 4):
                continue
            images = value[None] if value.dim() == 3 else value[: self.max_images]  # 3-d: a grid
            nrow = max(1, int(math.ceil(math.sqrt(images.shape[0]))))
            grid = _to_uint8_grid(images, self.clamp, nrow)
            path = outdir / f"{key}_{stem}.png"
            Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(path)
            written.append(path)
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_image(f"{split}/{key}", grid, trainer.global_step,
                                            dataformats="HWC")
        captions = logs.get("captions")
        if captions:
            text = "".join(f"{i}\t{c or '<unconditional>'}\n"
                           for i, c in enumerate(list(captions)[: self.max_images]))
            (outdir / f"captions_{stem}.txt").write_text(text, encoding="utf-8")
        logger.info("logged %d image grids to %s", len(written), outdir)
        return written
