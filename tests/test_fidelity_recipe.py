"""docs/fidelity.md's recipe rows (1, 5-10, D1-D10) agree with the code's defaults and README."""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf
from scripts_loader import load_script

from ldm.evaluation.reconstruction import DEFAULT_SSIM, SSIM_SETTINGS

ROOT = Path(__file__).resolve().parents[1]


def _row(key: str) -> str:
    text = (ROOT / "docs" / "fidelity.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(rf"^\| {key} \|", line)]
    assert len(rows) == 1, f"docs/fidelity.md has {len(rows)} rows for {key}"
    assert rows[0].count(" | ") == 5, f"row {key} must have six cells"
    return rows[0]


def test_every_point_has_a_row():
    for key in [*map(str, range(1, 13)), *(f"D{i}" for i in range(1, 11))]:
        _row(key)
    assert "docs/fidelity.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_recipe_rows_match_the_defaults():
    row1 = _row("1")
    for name in ("vq_f4_finetune", "vq_f8_finetune"):
        cfg = OmegaConf.load(ROOT / "configs" / "autoencoder" / f"{name}.yaml")
        assert cfg.model.scale_lr is True
    assert "1.62e-4" in row1 and "3.24e-4" in row1 and "--no-scale_lr" in row1
    fid = load_script("fid").build_parser()
    gen = fid.parse_args(["generate", "--ckpt", "c", "--store", "s", "--outdir", "o"])
    assert gen.prompt_sampling == "uniform" and "--prompt-sampling data" in _row("6")
    assert gen.format == "png" and "--format store --shard i/n" in _row("7")
    eval_vae = load_script("eval_vae").build_parser().parse_args(["--data", "d", "--config", "c"])
    assert eval_vae.ssim == DEFAULT_SSIM == "wang"
    assert all(f"{k}={v}" in _row("8") for k, v in SSIM_SETTINGS["wang"].items())
    assert "--ssim uniform" in _row("8") and "--partition 256 512" in _row("9")
    sample = load_script("sample").build_parser().parse_args(["--ckpt", "c", "--all-levels"])
    assert sample.all_levels and "--all-levels" in _row("10")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for flag in ("--prompt-sampling uniform", "--format store", "--partition 256 512",
                 "--all-levels", "--gpus 0,1,2"):
        assert flag in readme, flag
