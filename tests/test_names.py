"""One spelling of the TIL column (``prob_til``); the old ``prob_tils`` is read with a warning."""
from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from tcga_store import one_tile_with_wsinfer_csv

from data_prep.tumor_til import TIL_COLUMN, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _inputs(tmp_path: Path, til_column: str) -> list[str]:
    return one_tile_with_wsinfer_csv(
        tmp_path, 64, ["minx", "miny", "width", "height", "prob_tumor", til_column],
        [[0, 0, 128, 128, 0.25, 0.75]])


def _til(tmp_path: Path) -> float:
    with h5py.File(tmp_path / "tiles" / "S1.h5", "r") as f:
        return float(f["til_prob"][0])


def test_one_spelling_is_the_default(tmp_path, recwarn):
    assert TIL_COLUMN == "prob_til" and build_parser().parse_args(
        ["--tiles", "t"]).til_column == "prob_til"
    assert main(_inputs(tmp_path, "prob_til")) == 0
    assert _til(tmp_path) == 0.75
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_old_spelling_read_with_a_deprecation_warning(tmp_path, caplog):
    args = _inputs(tmp_path, "prob_tils")
    with pytest.warns(DeprecationWarning, match="old spelling 'prob_tils'; name it 'prob_til'"):
        assert main(args) == 0
    assert _til(tmp_path) == 0.75
    assert "old spelling 'prob_tils'" in caplog.text


def test_docs_use_one_spelling_and_name_the_wsinfer_models():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for text in (readme, (ROOT / "data_prep" / "tumor_til.py").read_text(encoding="utf-8")):
        assert "--model breast-tumor-resnet34.tcga-brca" in text
        assert "--model pancancer-lymphocytes-inceptionv4.tcga" in text
        assert "--til-column prob_Lymphocytes" in text and "--tumor-column prob_Tumor" in text
    assert "prob_tils" not in readme
