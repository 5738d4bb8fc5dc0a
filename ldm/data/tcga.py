"""TCGA patch dataset and datamodule over the data_prep training stores (docs/data_format.md §3).

Every random choice of a sample (crop, flips, summary, classifier-free-guidance dropout) comes from
a per-sample generator. The training loader asks for ``(epoch, index)`` keys
(:class:`~ldm.data.sampling.EpochSampler`) and the generator is seeded with ``(seed, index,
epoch)``: the same in every worker layout and after a mid-epoch resume. A bare index (any other
loader) seeds it with ``(seed, index, one draw from the process's torch RNG)``, which still makes
epochs differ and follows Lightning's seeding of the main process and of every worker.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data.captions import (
    UNCONDITIONAL_CLASS,
    caption_from_levels,
    class_label_from_level_ids,
    drop_decisions,
    legacy_class_label,
    level_name,
    prob_to_level,
)
from ldm.data.patches import PATCH_SIZE, crop_origin
from ldm.data.sampling import EpochSampler, SampleKey
from ldm.data.store import (  # noqa: F401  (REQUIRED_DATASETS, store_problem re-exported)
    REQUIRED_DATASETS,
    LazyFile,
    decode_jpeg,
    missing_datasets,
    not_a_store,
    read_latents_info,
    read_slide_summaries,
    store_problem,
)
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

SUMMARY_MODES = ("first", "random", "wrong_slide")

def _level(p: float, n_levels: int) -> int | None:
    """Level of a probability, None where it is unknown (NaN)."""
    return None if math.isnan(p) else prob_to_level(p, n_levels)


class TCGAPatchDataset(Dataset):
    """Patches of one split store with captions ``"{tumor} tumor; {til} til; {summary}"``.

    Items are dicts: ``image`` float32 ``(size, size, 3)`` in [-1, 1], ``caption`` (str),
    ``class_label`` (int, 0-3, or 4 = unconditional), ``summary`` (the caption's summary) and,
    with ``latents_path``, ``latent``
    (the cached pre-quantization first-stage latent of the same crop and flips). Indexed by
    ``i`` or by an ``(epoch, i)`` key, which fixes the sample's random choices (module docstring).

    Args:
        path: ``train.h5`` / ``test.h5`` written by ``data_prep/build_dataset.py``.
        size: crop size; tiles larger than this are cropped (randomly or centred,
            :func:`ldm.data.patches.crop_origin`).
        random_crop: random crop (training) instead of a centre crop.
        flip: random horizontal and vertical flips.
        p_uncond: probability of replacing the conditioning by the unconditional one
            (caption and summary ``""``, class 4), drawn for every sample. Configs whose model
            uses a Conditioner set the dropout on its embedders (``ucg_rate``) instead and
            leave this at 0.
        summary_mode: ``first`` (the slide's first summary), ``random`` (a random one of the
            slide's summaries; the five-summaries ablation) or ``wrong_slide`` (a random summary of
            a different slide; the random-summary ablation).
        n_levels: number of tumor/TIL levels (2: low/high).
        legacy_til_exemption: reproduce the original PathLDM dataset, which never dropped the
            caption of a high-TIL patch.
        legacy_class_label: reproduce the original class-conditional dataset: labels from
            ``p > 0.5`` and a known label never dropped (its dropout was overwritten); patches
            without a probability still get class 4.
        seed: dataset seed mixed into every per-sample generator.
        latents_path: optional store of cached first-stage latents (``scripts/cache_latents.py``).
    """

    accepts_sample_keys = True  # EpochSampler may pass (epoch, index) keys

    def __init__(self, path: str | Path, size: int = PATCH_SIZE, random_crop: bool = True,
                 flip: bool = True, p_uncond: float = 0.0, summary_mode: str = "first",
                 n_levels: int = 2, legacy_til_exemption: bool = False, seed: int = 0,
                 latents_path: str | Path | None = None,
                 legacy_class_label: bool = False) -> None:
        super().__init__()
        if summary_mode not in SUMMARY_MODES:
            raise ValueError(f"summary_mode must be one of {SUMMARY_MODES}, got {summary_mode!r}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        level_name(0, n_levels)  # validates n_levels
        self.path = Path(path)
        self.size = int(size)
        self.random_crop = random_crop
        self.flip = flip
        self.p_uncond = float(p_uncond)
        self.summary_mode = summary_mode
        self.n_levels = n_levels
        self.legacy_til_exemption = legacy_til_exemption
        self.legacy_class_label = legacy_class_label
        self.seed = int(seed)
        self._file = LazyFile(self.path)
        self._read_metadata()
        self.latents_path = Path(latents_path) if latents_path else None
        self._latent_file = LazyFile(self.latents_path) if self.latents_path else None
        if self.latents_path is not None:
            self._check_latents()

    def _read_metadata(self) -> None:
        """Read the small per-patch and per-slide arrays; images stay on disk."""
        if not self.path.is_file():
            raise FileNotFoundError(f"dataset store not found: {self.path}")
        with h5py.File(self.path, "r") as f:
            missing = missing_datasets(f)
            if missing:
                raise KeyError(not_a_store(self.path, missing))
            self.slide_index = f["slide_index"][()].astype(np.int64)
            self.tumor_prob = f["tumor_prob"][()].astype(np.float64)
            self.til_prob = f["til_prob"][()].astype(np.float64)
            self.slides = [str(s) for s in f["slides"].asstr()[()]]
            self.summaries = read_slide_summaries(f)
            self.tile_size = int(f.attrs.get("tile_size", 0)) or None
            n_images = len(f["images"])
        n = len(self.slide_index)
        if not (n == n_images == len(self.tumor_prob) == len(self.til_prob)):
            raise ValueError(f"{self.path}: images, slide_index, tumor_prob and til_prob differ "
                             f"in length ({n_images}, {n}, {len(self.tumor_prob)}, "
                             f"{len(self.til_prob)})")
        if n and (self.slide_index.min() < 0 or self.slide_index.max() >= len(self.slides)):
            raise ValueError(f"{self.path}: slide_index points outside 'slides'")
        for name, p in (("tumor_prob", self.tumor_prob), ("til_prob", self.til_prob)):
            bad = (p < 0) | (p > 1)
            if bad.any():
                raise ValueError(f"{self.path}: {name} outside [0, 1] at index "
                                 f"{int(np.argmax(bad))}")
            if np.isnan(p).any():
                logger.warning("%s: %d patches have unknown %s; their captions omit it and their "
                               "class label is unconditional", self.path, int(np.isnan(p).sum()),
                               name)
        with_summary = [s for s, sums in enumerate(self.summaries) if sums]
        if self.summary_mode == "wrong_slide" and len(with_summary) < 2:
            raise ValueError(f"{self.path}: summary_mode 'wrong_slide' needs at least two slides "
                             f"with summaries, found {len(with_summary)}")
        self._slides_with_summary = np.asarray(with_summary, dtype=np.int64)

    def _check_latents(self) -> None:
        """Validate the cached-latents store against this dataset."""
        if not self.latents_path.is_file():
            raise FileNotFoundError(f"latents store not found: {self.latents_path}")
        shape, image_size, source = read_latents_info(self.latents_path)
        with h5py.File(self.path, "r") as f:
            signature = str(f.attrs.get("signature", ""))
        if signature and source and signature != source:
            raise ValueError(f"{self.latents_path} was cached from another store than "
                             f"{self.path} (signatures differ); recache it")
        if shape[0] != len(self):
            raise ValueError(f"{self.latents_path}: {shape[0]} latents for {len(self)} patches "
                             f"in {self.path}")
        if image_size != self.size or (self.tile_size and self.tile_size != self.size):
            raise ValueError(f"cached latents cover whole {image_size}px tiles; set size to the "
                             f"tile size ({self.tile_size}) so no crop is needed")
        self.latent_variants = shape[1]
        if self.flip and self.latent_variants != 4:
            raise ValueError(f"{self.latents_path} was cached without flipped variants; set "
                             "flip: false or recache with flips")

    def __len__(self) -> int:
        return len(self.slide_index)

    def _h5(self) -> tuple[h5py.Dataset, h5py.Dataset | None]:
        """Image and latent datasets, opened lazily once per process (workers reopen them)."""
        latents = self._latent_file["latents"] if self._latent_file is not None else None
        return self._file["images"], latents

    def sample_rng(self, idx: int, epoch: int | None = None) -> np.random.Generator:
        """The generator of sample ``idx`` in ``epoch`` (None: consumes one torch RNG draw)."""
        if epoch is not None:
            return np.random.default_rng([self.seed, int(idx), 1, int(epoch)])
        draw = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return np.random.default_rng([self.seed, int(idx), draw])

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        epoch, idx = key if isinstance(key, tuple) else (None, key)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} patches")
        rng = self.sample_rng(idx, epoch)
        # fixed draw order, independent of the sample's content
        u_drop, u_hflip, u_vflip, u_x, u_y, u_summary, u_slide = rng.random(7)
        hflip = self.flip and u_hflip < 0.5
        vflip = self.flip and u_vflip < 0.5
        images, latents = self._h5()
        image = self._crop(decode_jpeg(images[idx]), u_x, u_y, idx)
        if hflip:
            image = image[:, ::-1]
        if vflip:
            image = image[::-1]
        item = self._conditioning(idx, u_drop, u_summary, u_slide)
        item["image"] = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0)
        if latents is not None:
            variant = (2 * int(vflip) + int(hflip)) if self.latent_variants == 4 else 0
            item["latent"] = torch.from_numpy(
                latents[idx, variant].astype(np.float32))
        return item

    def _crop(self, tile: np.ndarray, u_x: float, u_y: float, idx: int) -> np.ndarray:
        h, w = tile.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(f"{self.path}: tile {idx} is {w}x{h}, smaller than size {self.size}")
        if self.random_crop:
            x, y = crop_origin(w, h, self.size, u_x, u_y)
        else:
            x, y = crop_origin(w, h, self.size)
        return tile[y: y + self.size, x: x + self.size]

    def _summary(self, slide: int, u_summary: float, u_slide: float) -> str:
        if self.summary_mode == "wrong_slide":
            others = self._slides_with_summary[self._slides_with_summary != slide]
            slide = int(others[int(u_slide * len(others))])
        sums = self.summaries[slide]
        if not sums:
            return ""
        if self.summary_mode == "first":
            return sums[0]
        return sums[int(u_summary * len(sums))]

    def _conditioning(self, idx: int, u_drop: float, u_summary: float,
                      u_slide: float) -> dict[str, Any]:
        """Caption and class label of a patch, with classifier-free-guidance dropout."""
        tumor = _level(self.tumor_prob[idx], self.n_levels)
        til = _level(self.til_prob[idx], self.n_levels)
        summary = self._summary(int(self.slide_index[idx]), u_summary, u_slide)
        caption = self.caption(tumor, til, summary)
        if tumor is None or til is None:
            label = UNCONDITIONAL_CLASS
        elif self.legacy_class_label:
            label = legacy_class_label(self.tumor_prob[idx], self.til_prob[idx])
        else:
            label = (class_label_from_level_ids(tumor, til) if self.n_levels == 2
                     else UNCONDITIONAL_CLASS)
        # the original never dropped high-TIL captions
        exempt = self.legacy_til_exemption and til is not None and til > 0
        if drop_decisions([u_drop], self.p_uncond, [exempt])[0]:
            caption = summary = ""
            if not (self.legacy_class_label and label != UNCONDITIONAL_CLASS):
                label = UNCONDITIONAL_CLASS  # the original overwrote a dropped known label
        return {"caption": caption, "class_label": label, "summary": summary.strip()}

    def caption(self, tumor: int | None, til: int | None, summary: str) -> str:
        """Training caption from levels (None: unknown, left out as the original did)."""
        if tumor is not None and til is not None:
            return caption_from_levels(level_name(tumor, self.n_levels),
                                       level_name(til, self.n_levels), summary).rstrip()
        parts = [f"{level_name(v, self.n_levels)} {name}"
                 for v, name in ((tumor, "tumor"), (til, "til")) if v is not None]
        return "; ".join(parts + [summary.strip()]).strip("; ").strip()


def _build_dataset(cfg: Mapping[str, Any] | None) -> Dataset | None:
    """A dataset from ``{target, params}`` or from :class:`TCGAPatchDataset` keyword arguments."""
    if cfg is None:
        return None
    if "target" in cfg:
        return instantiate_from_config(cfg)
    return TCGAPatchDataset(**cfg)


def _global_seed() -> int:
    """The seed ``seed_everything`` set (Lightning's own distributed sampler uses it too)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class TCGAPatchData(pl.LightningDataModule):
    """Train/validation/test loaders over TCGA patch stores.

    ``train``, ``validation`` and ``test`` are :class:`TCGAPatchDataset` arguments (or a
    ``{target, params}`` dataset config). Memory pinning is on only when training on CUDA.
    """

    config_schema = {"train": TCGAPatchDataset, "validation": TCGAPatchDataset,
                     "test": TCGAPatchDataset}  # keys of these mappings: its parameters

    def __init__(self, batch_size: int, train: Mapping[str, Any] | None = None,
                 validation: Mapping[str, Any] | None = None,
                 test: Mapping[str, Any] | None = None, num_workers: int = 0,
                 persistent_workers: bool | None = None, pin_memory: bool | None = None,
                 drop_last: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.persistent_workers = (self.num_workers > 0 if persistent_workers is None
                                   else bool(persistent_workers) and self.num_workers > 0)
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.configs = {"train": train, "validation": validation, "test": test}
        self.datasets: dict[str, Dataset] = {}
        self._resume: tuple[int, int] | None = None
        self._position = [0, 0]  # [epoch, its training batches so far]: on_before_batch_transfer

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (cheap: metadata only; images are read lazily)."""
        for split, cfg in self.configs.items():
            if cfg is not None and split not in self.datasets:
                self.datasets[split] = _build_dataset(cfg)

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        if split not in self.datasets:
            self.setup()
        if split not in self.datasets:
            if split == "train":
                raise ValueError("no training data: set data.params.train")
            return []  # Lightning skips evaluation without loaders
        pin = self.pin_memory
        if pin is None:
            trainer = getattr(self, "trainer", None)
            accelerator = getattr(trainer, "accelerator", None)
            pin = type(accelerator).__name__ == "CUDAAccelerator"
        dataset = self.datasets[split]
        sampler = None
        if shuffle:  # training: resumable order, per-sample randomness keyed by (epoch, index)
            sampler = EpochSampler(dataset, shuffle=True, seed=_global_seed(),
                                   keyed=getattr(dataset, "accepts_sample_keys", False))
            if self._resume is not None:
                epoch, batches = self._resume
                sampler.resume(epoch, batches * self.batch_size)
                self._resume = None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.persistent_workers,
                          pin_memory=pin, drop_last=self.drop_last and shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches of the current epoch (Lightning calls this once a batch)."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if self._position[0] != trainer.current_epoch:
                self._position = [int(trainer.current_epoch), 0]
            self._position[1] += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position in the training data (epoch, batches of it done), saved in checkpoints."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epoch, batches = int(trainer.current_epoch), 0
        if self._position[0] == epoch:
            batches = self._position[1]
        if batches >= trainer.num_training_batches:  # saved at the end of an epoch
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        """Continue the training data where a checkpoint left it (the next train loader)."""
        if state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))
            self._position = list(self._resume)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)
