"""Helpers shared by the data-preparation commands: logging, sharding, atomic writes, summaries."""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.atomic import pid_alive

logger = logging.getLogger(__name__)

# Third-party loggers that may echo request details (headers, bodies) at DEBUG level.
_QUIET_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "PIL", "h5py")


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (which may be swapped, e.g. by test capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str = "INFO") -> None:
    """Configure root logging for a CLI run (idempotent); HTTP client loggers stay at WARNING."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # a handler of logging.basicConfig (a calling script's) already prints: adding ours would
    # print every line twice
    if not any(isinstance(h, _StderrHandler) or type(h) is logging.StreamHandler
               for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def add_logging_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level``."""
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity (default: %(default)s)")


def parse_shard(spec: str | None) -> tuple[int, int]:
    """Parse ``"i/n"`` (0-based ``i``) into ``(i, n)``; None means the whole list."""
    if spec is None:
        return 0, 1
    try:
        i_str, n_str = spec.split("/")
        i, n = int(i_str), int(n_str)
    except ValueError as e:
        raise ValueError(f"--shard must look like 'i/n' (e.g. 0/4), got {spec!r}") from e
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need n >= 1 and 0 <= i < n")
    return i, n


def select_shard(items: Sequence[Any], shard: tuple[int, int]) -> list[Any]:
    """Items ``i, i+n, i+2n, ...`` of a sorted list, so shards are disjoint and cover it."""
    i, n = shard
    return list(items)[i::n]


def tmp_path_for(path: Path) -> Path:
    """The temporary name a file is written under before its atomic rename."""
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; rename it to ``path`` on success, delete it on error."""
    path = Path(path)
    tmp = tmp_path_for(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (indented, UTF-8)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """All valid records of a JSONL file (read only); invalid lines are skipped with a warning."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipping an invalid line (torn write?)", path, n)
    return out


class JsonlLog:
    """Append-only JSONL file shared by worker threads; every line is flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._tail_checked = False

    def repair(self) -> None:
        """Remove what a killed writer can leave, so strict JSONL readers never meet it.

        A torn last line is cut off (one ``truncate``); invalid lines elsewhere are dropped by an
        atomic rewrite. Call it only while holding the file's :func:`output_lock`.
        """
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a killed run left half a line
            logger.warning("%s: removing a torn last line of %d bytes (an interrupted write)",
                           self.path, len(data) - end)
            os.truncate(self.path, end)
            data = data[:end]
        lines = [ln for ln in data.decode("utf-8", errors="replace").splitlines(keepends=True)
                 if ln.strip()]
        good = [ln for ln in lines if _is_json(ln)]
        if len(good) < len(lines):
            logger.warning("%s: dropping %d invalid line(s) (rewritten atomically)", self.path,
                           len(lines) - len(good))
            write_text_atomic(self.path, "".join(good))

    def records(self) -> list[dict]:
        """All valid records."""
        return read_jsonl(self.path)

    def append(self, record: dict) -> None:
        """Append one record atomically with respect to other threads."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._tail_checked:  # never glue a record to a torn line
                self._tail_checked = True
                if self.path.exists() and self.path.stat().st_size:
                    with self.path.open("rb") as fh:
                        fh.seek(-1, os.SEEK_END)
                        if fh.read(1) != b"\n":
                            line = "\n" + line
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


@dataclass
class RunSummary:
    """What a command did: items done, skipped and failed (with reasons)."""

    what: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, 1 otherwise."""
        return 1 if self.failed else 0

    def render(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"{self.what}: {len(self.done)} done, {len(self.skipped)} skipped "
                 f"(already finished), {len(self.failed)} failed"]
        lines += [f"  {k}: {v}" for k, v in self.extra.items()]
        if self.failed:
            lines.append("failures:")
            lines += [f"  {name}: {reason}" for name, reason in sorted(self.failed.items())]
        return "\n".join(lines)

    def report(self) -> int:
        """Print the summary to stdout, log failures, return the exit code."""
        for name, reason in sorted(self.failed.items()):
            logger.error("%s failed: %s", name, reason)
        print(self.render(), file=sys.stdout, flush=True)
        return self.exit_code


def existing_file(value: str) -> Path:
    """argparse type: a path that must exist."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {value}")
    return path


# ------------------------------------------------------------------------------ output lock
class OutputLocked(RuntimeError):
    """Another live run holds the output's lock; the message names it and its pid."""


def lock_path_for(target: Path, tag: str = "") -> Path:
    """The lock file of an output: ``DIR/.lock[tag]`` for a folder, ``FILE.lock`` for a file."""
    if target.is_dir():
        return target / f".lock{tag}"
    return target.with_name(f"{target.name}.lock{tag}")


def _holder_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _acquire(path: Path, target: str | Path, mode: int) -> int:
    """An fd of ``path`` holding ``flock`` ``mode``; :class:`OutputLocked` when it is held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid and pid_alive(pid) else "a sharded run"
            raise OutputLocked(f"{target} is in use by another run ({who}, lock file {path}); "
                               "wait for it to finish or use another output") from None
        # the previous holder may have removed the file between our open and flock: retry then
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(target: str | Path, tag: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on ``target`` (a folder or file) for the duration of a run.

    The lock is an ``flock`` on a lock file holding the holder's pid: the kernel drops it when
    the holder dies (even by SIGKILL), so a stale lock file of a dead pid is simply taken over.
    With a ``tag`` (a shard), the output's own lock is held shared and the tagged one
    exclusively: shards run side by side, and a run of the whole output excludes them all.
    Raises :class:`OutputLocked` with a one-line message when a live run holds it.
    """
    held: list[tuple[int, Path | None]] = []
    try:
        if tag:
            held.append((_acquire(lock_path_for(Path(target)), target, fcntl.LOCK_SH), None))
        path = lock_path_for(Path(target), tag)
        fd = _acquire(path, target, fcntl.LOCK_EX)
        held.append((fd, path))
        stale = _holder_pid(fd)
        if stale is not None and stale != os.getpid():
            logger.info("%s: taking over the lock of pid %d, which %s", target, stale,
                        "is still alive but no longer holds it" if pid_alive(stale)
                        else "is no longer running")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        for fd, owned in reversed(held):
            if owned is not None:
                with contextlib.suppress(OSError):
                    os.unlink(owned)
            os.close(fd)  # closing drops the flock


def remove_stale_tmp(targets: Iterable[Path]) -> list[str]:
    """Delete the temporary files a killed run left for ``targets`` (hold their lock)."""
    removed = []
    for target in targets:
        tmp = tmp_path_for(Path(target))
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    if removed:
        logger.info("removed %d leftover temporary file(s) of a killed run: %s", len(removed),
                    removed[:5])
    return removed


def file_fingerprint(path: Path, edge: int = 1 << 20) -> str:
    """Size plus SHA-256 of the first and last ``edge`` bytes: cheap, survives copies."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(edge))
        if size > edge:
            fh.seek(max(edge, size - edge))
            h.update(fh.read(edge))
    return f"{size}:{h.hexdigest()[:32]}"


# --------------------------------------------------------------------------------- CSV input
def read_csv_table(path: Path, columns: Sequence[str], hint: str = "") -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV (a BOM, as Excel writes, is fine) with the named ``columns``.

    A one-line ``ValueError`` names the file when it is not UTF-8 or lacks a column.
    """
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            missing = [c for c in columns if c not in cols]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; columns are {cols}"
                                 + (f" ({hint})" if hint else ""))
            return [{c: (row.get(c) or "") for c in columns} for row in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                         "UTF-8 (e.g. 'CSV UTF-8' in Excel)") from None
    except csv.Error as e:
        raise ValueError(f"{path}: malformed CSV ({e})") from None

