"""Packaging: the console entry points, the optional extras and their error messages."""
import contextlib
import importlib
import importlib.metadata as md
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"pathldm-train", "pathldm-sample", "pathldm-fid", "pathldm-cas", "pathldm-eval-vae",
            "pathldm-ckpt", "pathldm-cache-latents", "pathldm-demo", "pathldm-tile-wsi",
            "pathldm-tumor-til", "pathldm-summarize-reports", "pathldm-build-dataset",
            "pathldm-prepare-demo", "pathldm-app", "pathldm-sample-large",
            "pathldm-evaluate", "pathldm-export"}


@pytest.fixture(scope="module")
def entry_points(tmp_path_factory) -> dict[str, md.EntryPoint]:
    """The console scripts as setup.py declares them, read back through importlib.metadata."""
    out = tmp_path_factory.mktemp("egg")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    dist = md.PathDistribution(out / "pathldm.egg-info")
    return {ep.name: ep for ep in dist.entry_points.select(group="console_scripts")}


def test_every_command_resolves_to_this_checkout(entry_points):
    assert COMMANDS <= set(entry_points)
    for name, ep in entry_points.items():
        fn = ep.load()
        assert callable(fn), name
        module = sys.modules[ep.module]
        assert Path(module.__file__).resolve().is_relative_to(ROOT), (name, module.__file__)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_of_every_command(entry_points, name, monkeypatch):
    """What ``<name> --help`` runs: the entry point called with argv [name, --help]."""
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        entry_points[name].load()()
    assert exit_info.value.code in (0, None), name
    assert out.getvalue().startswith("usage: "), out.getvalue()[:200]  # data_prep sets prog


def test_installed_metadata_matches_setup(entry_points):
    """Where this checkout is the installed project (CI), its commands are the declared ones."""
    try:
        dist = md.distribution("pathldm")
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    except md.PackageNotFoundError:
        pytest.skip("pathldm is not installed")
    if Path(url.removeprefix("file://")).resolve() != ROOT:
        pytest.skip(f"the installed pathldm is another checkout ({url})")
    installed = {ep.name: ep.value for ep in dist.entry_points.select(group="console_scripts")}
    assert installed == {name: ep.value for name, ep in entry_points.items()}
    exe = Path(sys.executable).parent / "pathldm-sample"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage: pathldm-sample")


@pytest.mark.parametrize("call, extra", [
    ("ldm.evaluation.fid:load_inception", "eval"),
    ("data_prep.llm:ChatClient", "data"),
])
def test_missing_extra_names_it(call, extra, monkeypatch):
    """Without the optional package, the code that needs it names the extra to install."""
    from ldm.optional import MissingExtraError

    module_name, attr = call.split(":")
    fn = getattr(importlib.import_module(module_name), attr)
    for missing in ("pytorch_fid", "pytorch_fid.inception", "openai"):
        monkeypatch.setitem(sys.modules, missing, None)  # import raises ModuleNotFoundError
    args = {"eval": (), "data": ("gpt-x", "sk-test")}[extra]
    with pytest.raises(MissingExtraError, match=rf'pip install "pathldm\[{extra}\]"'):
        fn(*args)
