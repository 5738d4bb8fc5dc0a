"""Console entry points for the scripts whose ``main`` returns results rather than a status.

``pip install`` turns each ``pathldm-*`` entry point into ``sys.exit(fn())``; these scripts'
``main`` returns a dict or list (handy in tests and notebooks), so the installed commands go
through :func:`ldm.evaluation.cli.run_main` exactly as ``python scripts/<name>.py`` does:
errors become one logged line and exit status 1.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

from ldm.evaluation.cli import run_main


def _command(script: str) -> Callable[[], None]:
    """The console entry of ``scripts/<script>.py``."""
    def run() -> None:
        run_main(importlib.import_module(f"scripts.{script}").main)

    run.__doc__ = f"Run ``scripts/{script}.py`` with the command line's arguments."
    return run


sample = _command("sample")
sample_large = _command("sample_large")
fid = _command("fid")
evaluate = _command("evaluate")
cas = _command("cas")
eval_vae = _command("eval_vae")
ckpt_tools = _command("ckpt_tools")
export = _command("export")
