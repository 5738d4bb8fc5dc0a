"""Argparse ``type=`` factories that reject bad numbers with a one-line message naming the value.

One owner for numeric option checks, shared by ``data_prep`` and ``scripts``: every option that
takes a number goes through one of these, so ``nan``, ``inf``, negatives and out-of-range values
stop at parse time, before any work or deletion.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _parse(text: str, kind: type) -> float | int:
    """``text`` as ``kind`` (int or float), finite, else an argparse error."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(kind: type, lo: float | None, hi: float | None, lo_open: bool,
             hi_open: bool) -> Callable[[str], float | int]:
    """A ``type=`` callable for ``kind`` within [lo, hi] (open ends where asked)."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def check(text: str) -> float | int:
        value = _parse(text, kind)
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text!r} is outside {span}")
        return value

    check.__name__ = f"{kind.__name__} in {span}"  # argparse names the type in its messages
    return check


def finite_float(text: str) -> float:
    """Any finite float."""
    return _parse(text, float)


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """Finite float within [lo, hi]; ``None`` leaves that side unbounded."""
    return _bounded(float, lo, hi, lo_open, hi_open)


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """Integer within [lo, hi]; ``None`` leaves that side unbounded."""
    return _bounded(int, lo, hi, False, False)


positive_float = float_in(0.0, lo_open=True)
non_negative_float = float_in(0.0)
unit_float = float_in(0.0, 1.0)
positive_int = int_in(1)
non_negative_int = int_in(0)
seed_int = int_in(0, 2**32 - 1)  # what numpy and Lightning accept as a seed
