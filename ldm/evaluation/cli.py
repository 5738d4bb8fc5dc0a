"""Small command-line helpers shared by the evaluation scripts: logging, devices, tables, exits."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def configure_logging(verbose: bool = False) -> None:
    """Log to stderr at INFO (DEBUG when ``verbose``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)


def add_checkpoint_args(group: Any) -> None:
    """``--ckpt``, ``--config`` and ``--weights``: which trained model to load, and how."""
    group.add_argument("--ckpt", required=True,
                       help="checkpoint (.ckpt) or run directory logs/<run>/")
    group.add_argument("--config", nargs="+", default=None,
                       help="model config YAML(s), merged in order (default: embedded in the "
                            "checkpoint or the run directory's configs/*-project.yaml; needed "
                            "for released checkpoints)")
    group.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                       help="EMA or raw weights (auto: EMA when the checkpoint has them)")
    add_trust_arg(group)


def add_trust_arg(group: Any) -> None:
    """``--trust-checkpoint``: allow full-pickle checkpoint loads (off: weights-only)."""
    group.add_argument("--trust-checkpoint", action="store_true",
                       help="load checkpoints that a weights-only load refuses as full pickles; "
                            "this can run arbitrary code: only for files you trust")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the available accelerator (else CPU); anything else is checked to exist."""
    if name == "auto":
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
        if accelerator is not None and accelerator.is_available():
            return accelerator.current_accelerator()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", lambda: False)()
        if not available:
            raise RuntimeError(f"device {name!r} requested but not available; use --device cpu")
    return device


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` to ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from e
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table with aligned columns (floats as given; format them beforehand)."""
    cells = [[str(h) for h in headers]] + [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_main(main: Callable[[Sequence[str] | None], Any],
             argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``; on failure log the error and exit with status 1."""
    try:
        main(argv)
    except KeyboardInterrupt:
        logger.error("interrupted; rerun the same command to resume")
        sys.exit(130)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, OSError, ImportError) as e:
        logger.debug("traceback", exc_info=True)
        logger.error("%s: %s", type(e).__name__, e)
        sys.exit(1)
