"""Import the command-line scripts under ``scripts/`` as modules in tests."""
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_checkout() -> Path | None:
    """The checkout that the installed ``pathldm`` (``pip install -e .``) points at, if any."""
    import importlib.metadata as md
    import json

    try:
        url = json.loads(md.distribution("pathldm").read_text("direct_url.json") or "{}")
    except md.PackageNotFoundError:
        return None
    url = url.get("url", "")
    return Path(url.removeprefix("file://")).resolve() if url.startswith("file://") else None


def script_env() -> dict[str, str]:
    """The environment of ``python data_prep/<x>.py`` / ``python scripts/<x>.py`` run as a user.

    The scripts import the installed project. Where that is this checkout (CI, a fresh clone
    after the README's ``pip install -e .``) PYTHONPATH stays empty; where another checkout is
    installed, PYTHONPATH names this one, as its own install would.
    """
    import os

    return {**os.environ, "PYTHONPATH": "" if installed_checkout() == ROOT else str(ROOT)}
