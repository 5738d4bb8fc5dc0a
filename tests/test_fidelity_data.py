"""docs/fidelity.md's data rows (2, 3, 4, 11, 12) agree with the code's defaults and README."""
from __future__ import annotations

import re
from pathlib import Path

from data_prep import build_dataset, import_pathldm, tile_wsi, tumor_til
from ldm.data.patches import PATCH_SIZE

ROOT = Path(__file__).resolve().parents[1]


def _row(number: int) -> str:
    text = (ROOT / "docs" / "fidelity.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(rf"^\| {number} \|", line)]
    assert len(rows) == 1, f"docs/fidelity.md has {len(rows)} rows for point {number}"
    return rows[0]


def test_data_rows_match_the_defaults():
    tiling = tile_wsi.build_parser().parse_args(["--out", "x"])
    assert (tiling.tile_size, tiling.tissue_filter, tiling.edge_threshold,
            tiling.jpeg_quality) == (448, "edges", 15.0, 70)
    row2, row3 = _row(2), _row(3)
    assert "448 px at 10×" in row2 and f"random {PATCH_SIZE} crops" in row2
    assert "--tile-size 256" in row2
    assert "--tissue-filter edges --edge-threshold 15 --jpeg-quality 70" in row3
    assert "--tissue-filter otsu" in row3
    build = build_dataset.build_parser().parse_args(["--tiles", "t", "--out", "o"])
    assert build.drop_missing_probabilities is False
    assert "--drop-missing-probabilities" in _row(4) and "legacy_class_label" in _row(4)
    assert "python -m data_prep.import_pathldm" in _row(11)
    assert import_pathldm.NPZ_KEYS == ("indices", "summaries", "prob_tumor", "prob_til")
    assert all(f"`{k}`" in _row(11) for k in import_pathldm.NPZ_KEYS + import_pathldm.HDF5_KEYS)
    row12 = _row(12)
    assert f"`{tumor_til.TIL_COLUMN}`" in row12
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for model in ("breast-tumor-resnet34.tcga-brca", "pancancer-lymphocytes-inceptionv4.tcga"):
        assert model in row12 and f"--model {model}" in readme
    assert "python -m data_prep.import_pathldm" in readme
