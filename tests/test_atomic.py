"""Temporaries of atomic writes: a killed run's are removed at the next write, a live one's kept."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import torch

from ldm.atomic import pid_alive, remove_stale_tmp
from ldm.atomic import tmp_path as tmp_name
from ldm.evaluation.images import write_json


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def test_only_the_stale_temporaries_of_the_target_go(tmp_path, caplog):
    dead = dead_pid()
    out = tmp_path / "out"
    stale, live = tmp_path / f".out.{dead}.tmp", tmp_path / f".out.{os.getpid()}.tmp"
    for folder in (stale, live):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text("{}")
    stale_file = tmp_path / f".out.json.{dead}.tmp"  # another target's: not this one's to clean
    stale_file.write_text("partial")
    with caplog.at_level(logging.INFO, logger="ldm.atomic"):
        assert remove_stale_tmp([out]) == [stale]
    assert not stale.exists() and (live / "unet" / "config.json").is_file()
    assert stale_file.exists() and f"pid {dead}" in caplog.text
    assert remove_stale_tmp([tmp_path / "out.json"]) == [stale_file]
    assert remove_stale_tmp([out]) == []  # nothing left to remove


def test_atomic_writers_clean_their_target(tmp_path):
    from ldm.trainer_setup import atomic_checkpoint_io

    dead, live = dead_pid(), os.getppid()
    target = tmp_path / "results.json"
    for pid in (dead, live):
        (tmp_path / f".results.json.{pid}.tmp").write_text("{")
    write_json({"fid": 1.0}, target)
    assert json.loads(target.read_text()) == {"fid": 1.0}
    assert sorted(p.name for p in tmp_path.glob(".*")) == [f".results.json.{live}.tmp"]
    ckpt = tmp_path / "ckpts" / "last.ckpt"
    ckpt.parent.mkdir()
    leftover = tmp_path / "ckpts" / f".last.ckpt.{dead}.tmp"
    leftover.write_bytes(b"\x80")
    atomic_checkpoint_io().save_checkpoint({"step": torch.tensor(3)}, ckpt)
    assert not leftover.exists() and not tmp_name(ckpt).exists()
    assert torch.load(ckpt, weights_only=True)["step"] == 3
