"""Every data-preparation step runs both ways, ``python -m data_prep.<x>`` and
``python data_prep/<x>.py``, and a script as ``python scripts/<x>.py``: through the installed
project, with no path set up by the files themselves."""
import subprocess
import sys
from pathlib import Path

import pytest
from scripts_loader import script_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("step, options", [
    ("build_dataset", ("--split-file", "--id-chars")),
    ("summarize_reports", ("--n-summaries", "--base-url")),
    ("tile_wsi", ("--magnification", "--shard")),
    ("tumor_til", ("--tumor-csv-dir", "--stain-standin")),
])
def test_cli_help_both_ways(step, options):
    env = script_env()
    for cmd in ([sys.executable, "-m", f"data_prep.{step}", "--help"],
                [sys.executable, f"data_prep/{step}.py", "--help"]):
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert all(o in res.stdout for o in options), (cmd, options)


def test_a_script_runs_from_the_checkout_as_a_file():
    res = subprocess.run([sys.executable, "scripts/sample.py", "--help"], cwd=ROOT,
                         env=script_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--tumor" in res.stdout and "--ckpt" in res.stdout
