"""Numeric option checks: bad values stop at parse time with the value named."""
import argparse

import pytest

from ldm.argtypes import finite_float, float_in, int_in, positive_float, positive_int


def _parse(kind, text):
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=kind)
    return parser.parse_args(["--x", text]).x


@pytest.mark.parametrize("kind,text", [
    (finite_float, "nan"), (finite_float, "inf"), (finite_float, "abc"),
    (positive_float, "0"), (positive_float, "-1"), (int_in(1, 100), "500"),
    (int_in(1, 100), "2.5"), (positive_int, "0"), (float_in(0, 1), "1.5"),
])
def test_rejects(kind, text):
    with pytest.raises(argparse.ArgumentError, match=repr(text).replace(".", r"\.")):
        _parse(kind, text)


@pytest.mark.parametrize("kind,text,want", [
    (finite_float, "-3.5", -3.5), (positive_float, "1e-3", 1e-3), (int_in(1, 100), "100", 100),
    (float_in(0, 1), "0", 0.0), (positive_int, "7", 7),
])
def test_accepts(kind, text, want):
    assert _parse(kind, text) == want
