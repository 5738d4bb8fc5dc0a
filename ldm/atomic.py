"""Atomic writes: a target is written as ``.NAME.PID.tmp`` next to it, then renamed into place.

A run killed mid-write (SIGKILL, power loss) leaves its temporary file or folder behind; the next
write of the same target removes those whose PID is no longer running (logged). A live PID's
temporary is kept: another run may be writing it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def tmp_path(path: str | Path) -> Path:
    """The temporary name this process writes ``path`` under: ``.NAME.PID.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def tmp_dir(path: str | Path) -> Path:
    """A fresh, empty temporary folder for the folder ``path`` (:func:`tmp_path`'s name).

    A folder of that name is a leftover of an earlier process with this PID: this one is not
    writing it yet, so it is replaced.
    """
    tmp = tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _leftovers(directory: Path, names: set[str]) -> list[tuple[Path, int]]:
    """``(path, pid)`` of the temporaries of ``names`` in ``directory`` (one listing)."""
    pattern = re.compile(r"\.(.+)\.(\d+)\.tmp")
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        m = pattern.fullmatch(entry.name)
        if m and m.group(1) in names:
            found.append((Path(entry.path), int(m.group(2))))
    return found


def remove_stale_tmp(targets: Iterable[str | Path]) -> list[Path]:
    """Remove the temporaries (files or folders) of ``targets`` left by processes that are no
    longer running; one directory listing per folder of targets. Returns what was removed."""
    by_dir: dict[Path, set[str]] = {}
    for target in targets:
        target = Path(target)
        by_dir.setdefault(target.parent, set()).add(target.name)
    removed = []
    for directory, names in by_dir.items():
        for path, pid in _leftovers(directory, names):
            if pid == os.getpid() or pid_alive(pid):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            logger.info("removed %s, left by pid %d, which is no longer running", path, pid)
            removed.append(path)
    return removed
