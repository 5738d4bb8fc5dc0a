"""Optional dependencies: import them on first use and name the extra that installs them.

``pip install -e .`` installs what training, sampling and the quick-start demo need; the
OpenAI client (report summaries through an API) comes with ``[data]`` and pytorch-fid (FID/KID)
with ``[eval]``. Code that needs one of them imports it through :func:`require` (or
:class:`LazyModule` at module level), so a missing package ends in one actionable line instead
of a bare ``ModuleNotFoundError``.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``; if it is missing, raise :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        package = module.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs the optional package '{package}', which is not installed: "
            f"pip install \"pathldm[{extra}]\" (in a checkout: pip install -e \".[{extra}]\")"
        ) from e


class LazyModule:
    """A module imported through :func:`require` on its first attribute access."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        self._spec = (module, extra, purpose)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # introspection (copy, pickle) must not import
            raise AttributeError(name)
        return getattr(require(*self._spec), name)
