"""Helpers shared by the data-preparation commands: logging, sharding, atomic writes, summaries."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


class JsonlLog:
    """Append-only JSONL file shared by worker threads; every line is flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            with path.open("rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
            if torn:  # a killed run left half a line: start a fresh line after it
                with path.open("a", encoding="utf-8") as fh:
                    fh.write("\n")

    def records(self) -> list[dict]:
        """All valid records; torn or invalid lines are skipped with a warning."""
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping an invalid line (torn write?)", self.path, n)
        return out

    def append(self, record: dict) -> None:
        """Append one record atomically with respect to other threads."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


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
