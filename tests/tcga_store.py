"""Write small training stores in the format of docs/data_format.md §3 for tests."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ldm.data.store import encode_jpeg, write_attrs, write_rows, write_slide_table


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> np.ndarray:
    """JPEG-encode an RGB uint8 array into one vlen row."""
    return encode_jpeg(image, quality)


def write_store(path: str | Path, images: Sequence[np.ndarray], slide_index: Sequence[int],
                tumor_prob: Sequence[float], til_prob: Sequence[float], slides: Sequence[str],
                summaries: Sequence[Sequence[str]], split: str = "train") -> Path:
    """A training store with JPEG tiles and per-slide summaries (``""``-padded to K)."""
    path = Path(path)
    with h5py.File(path, "w") as f:
        write_rows(f, [jpeg_bytes(im) for im in images], slide_index, tumor_prob, til_prob,
                   coords=np.zeros((len(images), 2), dtype=np.int64))
        write_slide_table(f, slides, summaries)
        write_attrs(f, {"split": split, "tile_size": images[0].shape[0], "magnification": 10.0,
                        "seed": 0})
    return path


def random_store(path: str | Path, n: int = 16, tile: int = 32, n_slides: int = 2,
                 n_summaries: int = 1, seed: int = 0) -> Path:
    """A store of ``n`` smooth random tiles spread over ``n_slides`` slides."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    images = [np.asarray(Image.fromarray(c).resize((tile, tile), Image.BILINEAR)) for c in coarse]
    slides = [f"TCGA-{i:02d}" for i in range(n_slides)]
    summaries = [[f"slide {i} summary {j}" for j in range(n_summaries)] for i in range(n_slides)]
    return write_store(path, images, np.arange(n) % n_slides, rng.random(n), rng.random(n),
                       slides, summaries)


def one_tile_with_wsinfer_csv(root: Path, tile_size: int, header: Sequence[str],
                              rows: Sequence[Sequence[float]]) -> list[str]:
    """A one-tile 10x store of slide S1 (from 20x) and its wsinfer CSV; ``tumor_til`` arguments."""
    import csv

    from data_prep.hdf5io import encode_jpeg, write_tile_store

    tiles, csv_dir = root / "tiles", root / "wsinfer"
    tiles.mkdir()
    csv_dir.mkdir()
    attrs = {"slide_id": "S1", "mpp": 0.5, "objective_power": 20.0, "magnification": 10.0,
             "tile_size": tile_size, "level0_tile_size": 2 * tile_size, "stride": tile_size}
    tile = encode_jpeg(np.zeros((tile_size, tile_size, 3), np.uint8))
    write_tile_store(tiles / "S1.h5", [tile], np.array([[0, 0]]), np.ones(1), attrs)
    with (csv_dir / "S1.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return ["--tiles", str(tiles), "--tumor-csv-dir", str(csv_dir), "--til-csv-dir", str(csv_dir)]
