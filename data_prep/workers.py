"""Worker processes of the data-preparation commands: one process per item, dying with the run.

A process per item (a slide) costs a second of start-up against minutes of work, and buys two
things a shared pool cannot give: a process that dies (out of memory, a crash in a reader) names
its own item while the others go on, and no worker outlives a killed run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from typing import Any

from data_prep.common import setup_logging


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process die when ``parent_pid`` dies, even by SIGKILL.

    On Linux the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``); elsewhere a
    daemon thread polls the parent pid. Call it first thing in a worker process.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            _poll_parent(parent_pid)
    else:
        _poll_parent(parent_pid)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _poll_parent(parent_pid: int, every: float = 1.0) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child(conn, fn: Callable[[Any], Any], item: Any, log_level: str, parent: int) -> None:
    """Process body: run ``fn(item)``, send its result, exit."""
    die_with_parent(parent)
    setup_logging(log_level)
    conn.send(fn(item))
    conn.close()


def exit_description(code: int | None) -> str:
    """``killed by signal SIGKILL`` or ``exit code N`` for a process exit code."""
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def run_per_item(fn: Callable[[Any], Any], items: Sequence[Any], workers: int,
                 log_level: str = "INFO") -> Iterator[tuple[Any, Any, int | None]]:
    """Run ``fn(item)`` in a fresh spawned process per item, ``workers`` at a time.

    Yields ``(item, result, exit code)`` as processes finish; ``result`` is None when the
    process died before sending one. ``fn`` must be picklable (a module-level function or a
    ``functools.partial`` of one). Spawned, not forked: slide readers' handles must not be shared.
    """
    ctx = mp.get_context("spawn")
    todo, running = list(reversed(items)), {}
    try:
        while todo or running:
            while todo and len(running) < workers:
                item = todo.pop()
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, daemon=True,
                                   args=(send, fn, item, log_level, os.getpid()))
                proc.start()
                send.close()
                running[proc.sentinel] = (proc, recv, item)
            for sentinel in wait(list(running)):
                proc, recv, item = running.pop(sentinel)
                proc.join()
                try:
                    result = recv.recv() if recv.poll() else None
                except EOFError:  # poll() is also true at end of file: it died without a word
                    result = None
                recv.close()
                yield item, result, proc.exitcode
    finally:
        for proc, _, _ in running.values():
            proc.kill()
