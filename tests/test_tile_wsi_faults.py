"""Tiling under faults: SIGKILL of the run, a worker killed, two runs at once, changed settings
and inputs, bad options. Real slides, real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import pytest
from slide_factory import tissue_image, write_svs

from data_prep.common import output_lock
from data_prep.tile_wsi import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SIDES = (1024, 2048, 1024, 1024)  # s1 is larger, so a worker holds it open long enough to kill
TILES = {f"s{i}.h5": (side // 256) ** 2 for i, side in enumerate(SIDES)}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Four 40x slides with different tissue: 16 tiles of 64 px at 10x, 64 for the larger s1."""
    folder = tmp_path_factory.mktemp("slides")
    return [write_svs(folder / f"s{i}.svs", tissue_image(SIDES[i], SIDES[i], seed=i), (1, 4),
                      app_mag=40, mpp=0.25) for i in range(4)]


def _cmd(paths: list[Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.tile_wsi", *map(str, paths), "--out", str(out),
            "--tile-size", "64", "--tissue-filter", "otsu", "--min-tissue", "0", *extra]


def _children(pid: int) -> dict[int, str]:
    """Live (non-zombie) processes whose parent is ``pid``, with their command lines."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(d.name)] = cmd
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _stores(out: Path) -> dict[str, int]:
    res = {}
    for p in sorted(out.glob("*.h5")):
        with h5py.File(p, "r") as f:
            res[p.name] = len(f["tiles"])
    return res


def test_sigkill_of_the_run_takes_its_workers_along(tmp_path, slides):
    out = tmp_path / "tiles"
    proc = subprocess.Popen(_cmd(slides, out, "--workers", "2"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        workers = {p: c for p, c in _children(proc.pid).items() if "spawn_main" in c}
        time.sleep(0.02)
    assert len(workers) == 2, "the run did not start two workers"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    t0 = time.monotonic()
    while any(_alive(p) for p in workers) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers), "orphaned workers outlived the killed run"
    print(f"workers gone {time.monotonic() - t0:.2f} s after the SIGKILL of the run")
    # nothing half-written counts as done: a rerun finishes every slide
    assert main([*map(str, slides), "--out", str(out), "--tile-size", "64",
                 "--tissue-filter", "otsu", "--min-tissue", "0"]) == 0
    assert _stores(out) == TILES
    assert not list(out.glob("*.tmp"))


def test_a_killed_worker_names_its_slide_and_the_others_finish(tmp_path, slides):
    out = tmp_path / "tiles"
    victim = slides[1].resolve()
    proc = subprocess.Popen(_cmd(slides, out, "--workers", "2"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kills = []

    def assassin() -> None:  # SIGKILL whichever worker has the victim slide open
        while proc.poll() is None:
            for pid in _children(proc.pid):
                try:
                    fds = list(Path(f"/proc/{pid}/fd").iterdir())
                    if any(os.readlink(fd) == str(victim) for fd in fds):
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                except OSError:
                    continue
            time.sleep(0.005)

    thread = threading.Thread(target=assassin, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate(timeout=300)
    thread.join(timeout=5)
    assert kills and proc.returncode == 1, stderr[-3000:]
    assert "3 done, 0 skipped (already finished), 1 failed" in stdout, stderr[-3000:]
    assert (f"s1: {slides[1]}: the worker process died while tiling this slide (killed by "
            "signal SIGKILL") in stdout
    assert stdout.count("worker process died") == 1
    assert _stores(out) == {k: v for k, v in TILES.items() if k != "s1.h5"}


def test_two_runs_at_once_on_one_output(tmp_path, slides):
    out = tmp_path / "tiles"
    first = subprocess.Popen(_cmd(slides, out), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    while not (out / ".lock").exists() and first.poll() is None:
        time.sleep(0.005)
    # the second run is this test's own process, started while the first one tiles
    with pytest.raises(SystemExit) as err:
        main([*map(str, slides), "--out", str(out), "--tile-size", "64", "--tissue-filter",
              "otsu", "--min-tissue", "0"])
    stdout, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "4 done, 0 skipped (already finished), 0 failed" in stdout
    assert str(err.value).startswith(f"error: {out} is in use by another run (pid {first.pid}")
    assert "\n" not in str(err.value)
    assert _stores(out) == TILES
    # sharded runs lock their own shard, so they may run side by side
    with output_lock(out, "-shard-1-of-2"):  # shard 1 of 2 is running; shard 0 goes on
        assert main([*map(str, slides), "--out", str(out), "--tile-size", "64",
                     "--tissue-filter", "otsu", "--min-tissue", "0", "--shard", "0/2"]) == 0


def test_rerun_with_other_settings_is_refused_and_a_changed_slide_redone(tmp_path, slides,
                                                                          capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    mine = [folder / p.name for p in slides[:2]]
    for src, dst in zip(slides, mine):
        dst.write_bytes(src.read_bytes())
    out = tmp_path / "tiles"
    base = [*map(str, mine), "--out", str(out), "--tissue-filter", "otsu", "--min-tissue", "0"]
    assert main(base + ["--tile-size", "64"]) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.h5")}
    with pytest.raises(SystemExit, match=r"2 store\(s\) .* other settings \(s0.h5: "
                                         r"magnification 10.0 \(now 5.0\), tile_size 64 "
                                         r"\(now 128\)"):
        main(base + ["--magnification", "5", "--tile-size", "128"])
    assert {p.name: p.read_bytes() for p in out.glob("*.h5")} == before
    capsys.readouterr()
    mine[1].write_bytes(slides[2].read_bytes())  # s1.svs replaced by another slide's file
    assert main(base + ["--tile-size", "64"]) == 0
    assert "1 done, 1 skipped" in capsys.readouterr().out
    assert (out / "s0.h5").read_bytes() == before["s0.h5"]
    assert _stores(out) == {"s0.h5": 16, "s1.h5": 16}  # s1 now holds s2's 16 tiles
    assert main(base + ["--magnification", "5", "--tile-size", "128", "--overwrite"]) == 0


@pytest.mark.parametrize("option", [["--magnification", "0"], ["--mpp", "0"], ["--mpp", "-1"],
                                    ["--jpeg-quality", "500"], ["--tile-size", "0"],
                                    ["--min-tissue", "nan"], ["--workers", "0"],
                                    ["--stride", "-3"]])
def test_bad_numbers_are_refused_before_any_work(tmp_path, slides, capsys, option):
    out = tmp_path / "tiles"
    with pytest.raises(SystemExit) as err:
        main([str(slides[0]), "--out", str(out), *option])
    assert err.value.code == 2 and option[1] in capsys.readouterr().err
    assert not out.exists()


def test_tile_larger_than_slide_and_out_a_file(tmp_path, slides, capsys):
    out = tmp_path / "tiles"
    assert main([str(slides[0]), "--out", str(out), "--tile-size", "5000"]) == 1
    text = capsys.readouterr().out
    assert "0 done" in text and "1 failed" in text
    assert "s0.svs: the slide (1024x1024 level-0 px) is smaller than one tile (20000" in text
    assert not list(out.glob("*.h5"))
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(SystemExit, match="--out .*a_file is a file, not a folder"):
        main([str(slides[0]), "--out", str(afile)])
