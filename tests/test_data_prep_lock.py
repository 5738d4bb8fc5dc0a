"""The output lock of the data-preparation commands: held, named, and taken over when stale."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import build_dataset
from data_prep.common import OutputLocked, lock_path_for, output_lock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = ("import sys, time\nfrom data_prep.common import output_lock\n"
          "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")


def _hold(target: Path) -> subprocess.Popen:
    """A real process holding the lock of ``target`` until killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_held_lock_is_named_and_a_killed_holder_is_taken_over(tmp_path):
    from test_build_dataset import _make_inputs

    tiles, summaries = _make_inputs(tmp_path)
    out = tmp_path / "ds"
    out.mkdir()
    args = ["--tiles", str(tiles), "--summaries", str(summaries), "--out", str(out)]
    holder = _hold(out)
    try:
        with pytest.raises(SystemExit, match=rf"ds is in use by another run \(pid {holder.pid}"):
            build_dataset.main(args)
        assert not (out / "train.h5").exists()
        with pytest.raises(OutputLocked, match=str(holder.pid)):
            with output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    lock = lock_path_for(out)
    assert lock.read_text().strip() == str(holder.pid)  # the dead holder's stale lock file
    assert build_dataset.main(args) == 0  # taken over
    assert (out / "train.h5").is_file() and not lock.exists()


def test_lock_of_a_file_output(tmp_path):
    target = tmp_path / "s.jsonl"
    with output_lock(target) as lock:
        assert lock == tmp_path / "s.jsonl.lock" and lock.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputLocked, match="s.jsonl is in use"):
            with output_lock(target):
                pass
    assert not lock.exists()


def test_shards_run_side_by_side_but_not_with_a_whole_run(tmp_path):
    with output_lock(tmp_path, "-shard-0-of-2"), output_lock(tmp_path, "-shard-1-of-2"):
        with pytest.raises(OutputLocked, match=r"in use by another run \(a sharded run"):
            with output_lock(tmp_path):
                pass
        with pytest.raises(OutputLocked, match="shard-0-of-2"):
            with output_lock(tmp_path, "-shard-0-of-2"):
                pass
    with output_lock(tmp_path):
        with pytest.raises(OutputLocked, match=rf"pid {os.getpid()}"):
            with output_lock(tmp_path, "-shard-0-of-2"):
                pass
    assert not list(tmp_path.glob(".lock-shard*"))
