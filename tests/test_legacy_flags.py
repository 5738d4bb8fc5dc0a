"""The legacy flags reproduce the authors' two datasets exactly, patches without probabilities
included (their decision rules are written out below from tumor_til_in_text.py and
class_cond/tumor_til.py, with np.random.rand() replaced by the draw ``u``)."""
from __future__ import annotations

import itertools

import numpy as np
from tcga_store import write_store

from ldm.data.tcga import TCGAPatchDataset

PROBS = [None, 0.2, 0.5, 0.9]
SUMMARY = "a summary"


def original_text(p_tumor, p_til, u, p_uncond):
    levels = ["low", "high"]
    text_prompt = SUMMARY
    if p_til is not None:
        p_til = int(p_til * len(levels))
        text_prompt = f"{levels[p_til]} til; {text_prompt}"
    if p_tumor is not None:
        p_tumor = int(p_tumor * len(levels))
        text_prompt = f"{levels[p_tumor]} tumor; {text_prompt}"
    if u < p_uncond and (p_til is None or p_til == 0):
        text_prompt = ""
    return text_prompt


def original_class(p_tumor, p_til, u, p_uncond):
    label = None
    if u < p_uncond or (p_til is None or p_tumor is None):
        label = 4
    if p_til is not None and p_tumor is not None:
        label = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3}[(int(p_tumor > 0.5),
                                                              int(p_til > 0.5))]
    return label


def test_legacy_flags_reproduce_both_original_datasets(tmp_path):
    combos = list(itertools.product(PROBS, PROBS))
    nan = float("nan")
    path = write_store(tmp_path / "s.h5", [np.zeros((8, 8, 3), np.uint8)] * len(combos),
                       [0] * len(combos), [nan if t is None else t for t, _ in combos],
                       [nan if i is None else i for _, i in combos], ["S"], [[SUMMARY]])
    p_uncond = 0.5
    ds = TCGAPatchDataset(path, size=8, flip=False, p_uncond=p_uncond, legacy_til_exemption=True,
                          legacy_class_label=True)
    ours = TCGAPatchDataset(path, size=8, flip=False, p_uncond=p_uncond)
    differs = 0
    for idx, (tumor, til) in enumerate(combos):
        for u in (0.1, 0.9):  # dropped / kept draws
            got = ds._conditioning(idx, u, 0.0, 0.0)
            assert got["caption"] == original_text(tumor, til, u, p_uncond), (tumor, til, u)
            assert got["class_label"] == original_class(tumor, til, u, p_uncond), (tumor, til, u)
            fixed = ours._conditioning(idx, u, 0.0, 0.0)
            differs += fixed != got
    assert differs > 0  # without the flags the fixed behaviour differs (dropout, p = 0.5)
