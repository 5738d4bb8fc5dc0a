"""data_prep.common.setup_logging: one printing handler, whoever configured logging first."""
import logging

import pytest

from data_prep.common import setup_logging


@pytest.fixture
def root():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield root
    root.handlers, root.level = saved, level


def _printing(root: logging.Logger) -> list[logging.Handler]:
    """Handlers that print (pytest's capture handlers are StreamHandler subclasses: not these)."""
    from data_prep.common import _StderrHandler

    return [h for h in root.handlers
            if isinstance(h, _StderrHandler) or type(h) is logging.StreamHandler]


def test_adds_one_handler_and_is_idempotent(root):
    root.handlers = [h for h in root.handlers if h not in _printing(root)]
    setup_logging("DEBUG")
    setup_logging("DEBUG")
    assert len(_printing(root)) == 1 and root.level == logging.DEBUG


def test_keeps_a_calling_scripts_basic_config(root):
    root.handlers = [h for h in root.handlers if h not in _printing(root)]
    root.addHandler(logging.StreamHandler())  # what logging.basicConfig adds, e.g. scripts/demo.py
    setup_logging()
    assert len(_printing(root)) == 1
