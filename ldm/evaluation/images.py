"""Image sources for evaluation (split stores and image folders) and atomic image/JSON writes."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.atomic import remove_stale_tmp, tmp_path
from ldm.data.patches import PATCH_SIZE, crop_origin
from ldm.data.store import (
    IMAGES,
    LazyFile,
    open_jpeg,
    read_array,
    read_attrs,
    read_slide_summaries,
)

logger = logging.getLogger(__name__)

# The extensions pytorch-fid reads from a folder, so a folder yields the same files to both.
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
STORE_SUFFIXES = (".h5", ".hdf5")
PilTransform = Callable[[Image.Image], Image.Image]


def list_image_files(folder: str | Path) -> list[Path]:
    """Images directly inside ``folder``, selected and ordered as pytorch-fid does.

    The one exception: the grid that ``scripts/sample.py`` writes next to its samples (named by
    the folder's ``metadata.json``) is not a sample and is left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(f for ext in IMAGE_EXTENSIONS for f in folder.glob(f"*.{ext}"))
    grid = _sample_grid(folder)
    if grid is not None and grid in files:
        logger.info("%s: leaving out %s, the grid of the samples (metadata.json)", folder,
                    grid.name)
        files.remove(grid)
    return files


def _sample_grid(folder: Path) -> Path | None:
    """The grid image a sample.py ``metadata.json`` in ``folder`` names, if any."""
    try:
        meta = json.loads((folder / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    grid = meta.get("grid") if isinstance(meta, dict) else None
    return folder / grid if isinstance(grid, str) and "/" not in grid else None


def is_store(path: str | Path) -> bool:
    """True for an HDF5 split store path (``.h5``/``.hdf5`` file)."""
    path = Path(path)
    return path.suffix.lower() in STORE_SUFFIXES and path.is_file()


class SplitStore:
    """Read-only view of a split store (docs/data_format.md §3).

    :meth:`image` gives the centred ``patch_size`` crop of a tile larger than that (the recipe's
    448-px tiles: evaluation sees the 256-px patch the model makes, as training sees random ones);
    ``patch_size=None`` gives whole tiles. The HDF5 handle is opened lazily and re-opened in each
    process, so the object can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path, patch_size: int | None = PATCH_SIZE) -> None:
        self.path = Path(path)
        self.patch_size = patch_size
        if not self.path.is_file():
            raise FileNotFoundError(f"split store not found: {self.path}")
        self._h5 = LazyFile(self.path)
        try:
            with h5py.File(self.path, "r") as f:
                if IMAGES not in f:
                    raise KeyError(f"{self.path}: no 'images' dataset (not a split store?)")
                self._length = len(f[IMAGES])
                self.attrs = read_attrs(f)
        except OSError as e:
            raise OSError(f"{self.path}: cannot read as HDF5: {e}") from e

    def __len__(self) -> int:
        return self._length

    def close(self) -> None:
        """Close the HDF5 handle of this process."""
        self._h5.close()

    def image(self, index: int) -> Image.Image:
        """Tile ``index`` as an RGB PIL image, centre-cropped to ``patch_size`` if larger."""
        img = self._open(index).convert("RGB")
        if not self._crops(*img.size):
            return img
        left, top = crop_origin(*img.size, self.patch_size)
        return img.crop((left, top, left + self.patch_size, top + self.patch_size))

    def image_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of :meth:`image` ``index`` from its header, without decoding."""
        size = self._open(index).size
        return (self.patch_size, self.patch_size) if self._crops(*size) else size

    def _crops(self, w: int, h: int) -> bool:
        """Whether a ``w`` x ``h`` tile is cropped (smaller ones, e.g. other image sets, aren't)."""
        size = self.patch_size
        return size is not None and w >= size and h >= size and (w, h) != (size, size)

    def _open(self, index: int) -> Image.Image:
        data = self._h5[IMAGES][int(index)]
        try:
            return open_jpeg(data)
        except Exception as e:
            raise ValueError(f"{self.path}: images[{index}] is not a decodable image: {e}") from e

    def array(self, name: str) -> np.ndarray:
        """A whole dataset (e.g. ``tumor_prob``) as a numpy array; strings decoded as utf-8."""
        f = self._h5.get()
        if name not in f:
            raise KeyError(f"{self.path}: missing dataset {name!r}")
        return read_array(f, name)

    def slide_summaries(self) -> list[list[str]]:
        """The real (non-padding) summaries of every slide."""
        f = self._h5.get()
        missing = [k for k in ("summaries", "n_summaries") if k not in f]
        if missing:
            raise KeyError(f"{self.path}: missing dataset {missing[0]!r}")
        return read_slide_summaries(f)


def pil_transform(center_crop: int | None = None, resize: int | None = None) -> PilTransform | None:
    """Optional centre crop then bicubic resize to a square, applied before feature extraction."""
    if center_crop is None and resize is None:
        return None

    def apply(img: Image.Image) -> Image.Image:
        if center_crop is not None:
            w, h = img.size
            if center_crop > min(w, h):
                raise ValueError(f"centre crop {center_crop} is larger than the image ({w}x{h})")
            left, top = crop_origin(w, h, center_crop)
            img = img.crop((left, top, left + center_crop, top + center_crop))
        if resize is not None and img.size != (resize, resize):
            img = img.resize((resize, resize), Image.BICUBIC)
        return img

    return apply


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float ``(3, H, W)`` tensor in [0, 1] (as torchvision's ToTensor)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


class ImageDataset(Dataset):
    """Images of a folder (list of files) or of a split store (row indices), as [0, 1] tensors.

    Items are ``(3, H, W)`` float tensors, or ``(tensor, label)`` when ``labels`` are given.
    """

    def __init__(self, source: SplitStore | Sequence[str | Path],
                 indices: Sequence[int] | None = None, transform: PilTransform | None = None,
                 labels: Sequence[int] | None = None) -> None:
        self.source = source
        if isinstance(source, SplitStore):
            self.items: Sequence[Any] = (np.arange(len(source)) if indices is None
                                         else np.asarray(indices, dtype=np.int64))
        else:
            files = [Path(p) for p in source]
            self.items = files if indices is None else [files[i] for i in indices]
        if labels is not None and len(labels) != len(self.items):
            raise ValueError(f"{len(labels)} labels for {len(self.items)} images")
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        """The i-th image as RGB PIL image, before the transform."""
        item = self.items[i]
        if isinstance(self.source, SplitStore):
            return self.source.image(int(item))
        try:
            return Image.open(item).convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot read image {item}: {e}") from e

    def image_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of the i-th image before the transform (header only)."""
        item = self.items[i]
        if isinstance(self.source, SplitStore):
            return self.source.image_size(int(item))
        try:
            with Image.open(item) as img:
                return img.size
        except Exception as e:
            raise ValueError(f"cannot read image {item}: {e}") from e

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(img)
        x = pil_to_tensor(img)
        return x if self.labels is None else (x, int(self.labels[i]))


class PartitionDataset(Dataset):
    """Every full, non-overlapping ``size`` x ``size`` crop of every image, row-major.

    The paper's Table 3 partitions each DeepGlobe image into 256 (or 512) crops; a remainder
    narrower than ``size`` at the right or bottom edge is left out. Items are ``(3, size, size)``
    tensors in [0, 1]; ``crops[k]`` is ``(image index, left, top)`` of item k.
    """

    def __init__(self, images: ImageDataset, size: int) -> None:
        if size < 1:
            raise ValueError(f"partition size must be positive, got {size}")
        if images.transform is not None or images.labels is not None:
            raise ValueError("partition the images before any transform or label")
        self.images, self.size = images, size
        self.crops: list[tuple[int, int, int]] = []
        for i in range(len(images)):
            w, h = images.image_size(i)
            self.crops += [(i, left, top) for top in range(0, h - size + 1, size)
                           for left in range(0, w - size + 1, size)]
        if not self.crops:
            raise ValueError(f"no image is at least {size}x{size}: nothing to partition")
        self._cached: tuple[int, Image.Image] | None = None  # crops of one image are adjacent

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, k: int) -> torch.Tensor:
        i, left, top = self.crops[k]
        if self._cached is None or self._cached[0] != i:
            self._cached = (i, self.images.load(i))
        img = self._cached[1].crop((left, top, left + self.size, top + self.size))
        return pil_to_tensor(img)


def check_one_size(folder: Path, files: Sequence[Path]) -> None:
    """Refuse a folder of images of several sizes, naming the sizes found.

    Features are computed as pytorch-fid does, on the images as they are; resizing some of them
    silently would change the score, so a resize must be asked for (``--resize``).
    """
    sizes: dict[tuple[int, int], list[Path]] = {}
    for f in files:
        try:
            with Image.open(f) as img:  # reads the header only
                size = img.size
        except Exception as e:
            raise ValueError(f"cannot read image {f}: {e}") from e
        sizes.setdefault(size, []).append(f)
    if len(sizes) > 1:
        found = "; ".join(f"{w}x{h}: {len(fs)} (e.g. {fs[0].name})"
                          for (w, h), fs in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
        raise ValueError(f"{folder}: images of {len(sizes)} sizes ({found}); pass --resize N "
                         "(bicubic) or --center-crop N to compare them at one size")


def open_images(path: str | Path, n: int | None = None, seed: int = 0,
                transform: PilTransform | None = None, one_size: bool = False) -> ImageDataset:
    """Images of a split store or a folder; ``n`` draws a seeded random subset (kept in order).

    With ``one_size`` (for consumers that batch images), a folder of images of several sizes
    is refused unless a ``transform`` makes them one size.
    """
    path = Path(path)
    if is_store(path):
        source: SplitStore | list[Path] = SplitStore(path)
    elif path.is_dir():
        source = list_image_files(path)
    else:
        raise FileNotFoundError(f"{path}: neither an image folder nor a split store (.h5)")
    total = len(source)
    if total == 0 and isinstance(source, SplitStore):
        raise ValueError(f"{path}: the split store holds no images (0 rows in 'images'); "
                         "rebuild it with python -m data_prep.build_dataset")
    if total == 0:
        raise ValueError(f"{path}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if one_size and transform is None and isinstance(source, list):
        check_one_size(path, source)
    indices = None
    if n is not None and n < total:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(total, size=n, replace=False))
    elif n is not None and n > total:
        logger.warning("%s has %d images, fewer than the %d requested; using all", path, total, n)
    return ImageDataset(source, indices=indices, transform=transform)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], ``(B, 3, H, W)``, to uint8 ``(B, H, W, 3)`` (rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def save_png(image: np.ndarray, path: str | Path, clean_stale: bool = True) -> None:
    """Write a uint8 ``(H, W, 3)`` image as PNG atomically (temporary file, then rename).

    ``clean_stale``: first remove the target's temporaries left by killed runs (a folder
    listing: a caller writing many images does it once, :func:`ldm.atomic.remove_stale_tmp`).
    """
    path = Path(path)
    if clean_stale:
        remove_stale_tmp([path])
    tmp = tmp_path(path)
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically."""
    write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (removing the temporaries of killed runs first)."""
    path = Path(path)
    remove_stale_tmp([path])
    tmp = tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def make_grid(images: Sequence[np.ndarray], nrow: int, pad: int = 2) -> np.ndarray:
    """Tile uint8 ``(H, W, 3)`` images row-major, ``pad`` white pixels apart."""
    if not images:
        raise ValueError("no images to put in a grid")
    h, w, _ = images[0].shape
    nrow = max(1, min(nrow, len(images)))
    rows = (len(images) + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def make_labelled_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], pad: int = 2,
                       label_width: int = 112) -> np.ndarray:
    """One row of images per ``(label, images)`` with the label written on a white margin."""
    from PIL import ImageDraw

    if not rows or not all(images for _, images in rows):
        raise ValueError("every row of a labelled grid needs a label and at least one image")
    ncol = max(len(images) for _, images in rows)
    blank = np.full_like(rows[0][1][0], 255)
    body = make_grid([img for _, images in rows
                      for img in list(images) + [blank] * (ncol - len(images))], ncol, pad)
    canvas = Image.new("RGB", (label_width + body.shape[1], body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    h = rows[0][1][0].shape[0]
    for r, (label, _) in enumerate(rows):
        draw.text((4, pad + r * (h + pad) + h // 2 - 6), label, fill=(0, 0, 0))
    return np.asarray(canvas)
