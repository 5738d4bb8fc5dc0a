"""Every numeric option of the scripts and main.py stops bad values at parse time, naming them."""
from __future__ import annotations

import pytest
from scripts_loader import load_script

import main

# (script, the arguments before the bad option, option, bad value)
CASES = [
    ("sample", ["--ckpt", "x", "--prompt", "p"], "--scale", "nan"),
    ("sample", ["--ckpt", "x", "--prompt", "p"], "--scale", "-1"),
    ("sample", ["--ckpt", "x", "--prompt", "p"], "--eta", "-1"),
    ("sample", ["--ckpt", "x", "--prompt", "p"], "--eta", "inf"),
    ("sample", ["--ckpt", "x", "--prompt", "p"], "--steps", "0"),
    ("sample", ["--ckpt", "x", "--prompt", "p"], "--n", "-3"),
    ("sample", ["--ckpt", "x", "--prompt", "p"], "--batch-size", "0"),
    ("sample", ["--ckpt", "x", "--prompt", "p"], "--seed", "-1"),
    ("sample", ["--ckpt", "x"], "--class-label", "-2"),
    ("fid", ["generate", "--ckpt", "x", "--store", "s", "--outdir", "o"], "--scale", "nan"),
    ("fid", ["generate", "--ckpt", "x", "--store", "s", "--outdir", "o"], "--eta", "2"),
    ("fid", ["generate", "--ckpt", "x", "--store", "s", "--outdir", "o"], "--n", "0"),
    ("fid", ["generate", "--ckpt", "x", "--store", "s", "--outdir", "o"], "--steps", "-5"),
    ("fid", ["score", "--ref", "r.npz", "--samples", "s"], "--batch-size", "0"),
    ("fid", ["score", "--ref", "r.npz", "--samples", "s"], "--kid-subset-size", "1"),
    ("fid", ["score", "--ref", "r.npz", "--samples", "s"], "--kid-subsets", "0"),
    ("fid", ["score", "--ref", "r.npz", "--samples", "s"], "--resize", "0"),
    ("fid", ["score", "--ref", "r.npz", "--samples", "s"], "--num-workers", "-1"),
    ("fid", ["ref-stats", "--images", "i", "--out", "o.npz"], "--center-crop", "-8"),
    ("fid", ["sweep", "--ckpt", "x", "--ref", "r", "--outdir", "o"], "--scales", "nan"),
    ("cas", ["--real-test", "t.h5"], "--lr", "0"),
    ("cas", ["--real-test", "t.h5"], "--lr", "nan"),
    ("cas", ["--real-test", "t.h5"], "--epochs", "0"),
    ("cas", ["--real-test", "t.h5"], "--gamma", "-0.1"),
    ("cas", ["--real-test", "t.h5"], "--batch-size", "0"),
    ("cas", ["--real-test", "t.h5"], "--image-size", "0"),
    ("eval_vae", ["--data", "d", "--config", "c.yaml"], "--crop", "0"),
    ("eval_vae", ["--data", "d", "--config", "c.yaml"], "--batch-size", "-1"),
    ("eval_vae", ["--data", "d", "--config", "c.yaml"], "--n", "0"),
    ("ckpt_tools", ["inspect", "x.ckpt"], "--depth", "0"),
]


@pytest.mark.parametrize("script, before, option, value", CASES,
                         ids=[f"{c[0]}{c[2]}={c[3]}" for c in CASES])
def test_bad_numbers_stop_at_parse_time(script, before, option, value, capsys):
    parser = load_script(script).build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*before, option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert option in err and repr(value) in err, err


ENTRY_CASES = [
    ("main", ["--base", "c.yaml", "-t", "-s", "-1"], "-1"),
    ("main", ["--base", "c.yaml", "-t", "-s", str(2**40)], str(2**40)),
    ("main", ["--base", "c.yaml", "-t", "--num_nodes", "0"], "0"),
    ("cache_latents", ["--config", "c", "--store", "s", "--out", "o", "--batch-size", "0"], "0"),
    ("demo", ["--n", "0"], "0"),
    ("demo", ["--ldm-steps", "nan"], "nan"),
]


@pytest.mark.parametrize("script, argv, value", ENTRY_CASES,
                         ids=[f"{c[0]}{c[1][-2]}={c[2]}" for c in ENTRY_CASES])
def test_main_cache_latents_and_demo(script, argv, value, capsys):
    entry = main.main if script == "main" else load_script(script).main
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 2
    assert repr(value) in capsys.readouterr().err


def test_steps_beyond_the_models_timesteps():
    from types import SimpleNamespace

    from ldm.evaluation.sampling import check_steps

    check_steps(SimpleNamespace(num_timesteps=1000), 1000)
    with pytest.raises(ValueError, match="--steps 1001: the model has 1000 diffusion timesteps"):
        check_steps(SimpleNamespace(num_timesteps=1000), 1001)
