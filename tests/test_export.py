"""scripts/export.py: diffusers folders of tiny text- and class-conditional models."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_loader import load_script
from tiny_ldm import DDCONFIG, build_tiny_model, save_checkpoint, tiny_model_config

from ldm.checkpoint import load_model
from ldm.data.captions import conditioning_batch
from ldm.export import keymap

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["high tumor; low til; invasive ductal carcinoma", "low tumor; high til; necrosis"]
FID_JSON = {"reference": "/data/ref_train.npz", "dims": 2048, "prompt_sampling": "uniform",
            "results": [{"samples": "gen/train", "split": "train", "scale": 1.75, "n": 100,
                         "fid": 12.5, "kid": 0.0031, "kid_std": 0.0004}]}


EVALUATE_JSON = {"protocol": {"n": 24, "seed": 0}, "sample_sets": {"train": {"scale": 1.75}},
                 "flags": [], "metrics": {"inception": {"train": {"overall": {
                     "fd": 31.25, "kid": 0.0042, "precision": 0.5, "recall": 0.25,
                     "density": 0.75, "coverage": 0.5}}}}}


def _run_dir(tmp: Path, model_cfg: dict, seed: int) -> Path:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    model = build_tiny_model(model_cfg, seed=seed)
    save_checkpoint(model, run / "checkpoints" / "last.ckpt", {"model": model_cfg}, step=7)
    return run


@pytest.fixture(scope="module")
def text_export(tmp_path_factory, tiny_clip_dir):
    """A tiny text model's run (with an FID result) exported through the CLI."""
    tmp = tmp_path_factory.mktemp("export_text")
    run = _run_dir(tmp, tiny_model_config(tiny_clip_dir), seed=1)
    (run / "eval").mkdir()
    (run / "eval" / "fid_results.json").write_text(json.dumps(FID_JSON))
    (run / "eval" / "results.json").write_text(json.dumps(EVALUATE_JSON))
    load_script("export").main(["--ckpt", str(run), "--out", str(tmp / "out"),
                                "--license", "cc-by-nc-4.0"])
    return run, tmp / "out"


@pytest.fixture(scope="module")
def class_export(tmp_path_factory):
    """A tiny class-conditional model exported with its raw (non-EMA) weights."""
    from test_atomic import dead_pid

    tmp = tmp_path_factory.mktemp("export_class")
    run = _run_dir(tmp, tiny_model_config(None), seed=2)
    for pid in (dead_pid(), os.getppid()):  # folders of a killed export and of a live one
        (tmp / f".out.{pid}.tmp" / "unet").mkdir(parents=True)
    load_script("export").main(["--ckpt", str(run), "--out", str(tmp / "out"), "--no-ema"])
    return run, tmp / "out"


def _pipe(folder: Path):
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def snippet(text_export):
    """The text model card's Python snippet, executed offline in the folder: its namespace."""
    _, folder = text_export
    code = (folder / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the card's own code
    finally:
        os.chdir(cwd)
    return {"code": code, "namespace": namespace, "image": folder / "sample.png"}


@pytest.fixture(scope="module")
def cases(text_export, class_export, snippet):
    """Per kind: run dir, folder, the project model (exported weights) and the loaded pipeline.

    The text pipeline is the one the card's snippet loaded with ``from_pretrained``.
    """
    out = {}
    for which, (run, folder), weights in (("text", text_export, "ema"),
                                          ("class", class_export, "raw")):
        loaded = load_model(run, weights=weights)
        pipe = snippet["namespace"]["pipe"] if which == "text" else _pipe(folder)
        pipe.set_progress_bar_config(disable=True)
        out[which] = {"run": run, "folder": folder, "model": loaded.model,
                      "params": loaded.config["model"]["params"], "pipe": pipe}
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("which", ["text", "class"])
def test_key_mapping_complete_both_ways(which, cases):
    """Every U-Net/VQ key maps to exactly the diffusers model's keys, and back to the same."""
    case = cases[which]
    sd, params, pipe = case["model"].state_dict(), case["params"], case["pipe"]
    groups = keymap.split_components(list(sd), has_text=which == "text")
    cases = [("unet", keymap.unet_table(params["unet_config"]["params"]), keymap.UNET_PREFIX),
             ("vae", keymap.vae_table(params["first_stage_config"]["params"]["ddconfig"]),
              keymap.VAE_PREFIX)]
    for name, table, prefix in cases:
        km = keymap.build_map(groups[name], table, prefix)
        target = getattr(pipe, name).state_dict()
        out = keymap.convert({k: sd[k] for k in groups[name]}, km, target.keys(), what=name)
        assert all(out[k].shape == target[k].shape for k in target)
        back = keymap.convert(out, km, groups[name], inverse=True)
        assert back.keys() == set(groups[name])
        assert all(torch.equal(back[k], sd[k]) for k in back)
        missing = {k: v for k, v in out.items() if k != next(iter(out))}
        with pytest.raises(KeyError, match="absent"):
            keymap.convert(missing, km, inverse=True)
    assert len(groups["unet"]) == len(pipe.unet.state_dict())


@pytest.mark.parametrize("which", ["text", "class"])
def test_pipeline_matches_project_sampler(which, cases):
    """Denoiser output and a full guided DDIM run agree within 1e-4 (fp32), offline load."""
    from ldm.models.diffusion.ddim import DDIMSampler, guided_eps, model_denoiser

    model, pipe = cases[which]["model"], cases[which]["pipe"]
    conds = CAPTIONS if which == "text" else [1, 2]
    c = model.get_conditioning(conditioning_batch(conds))
    uc = model.get_unconditional_conditioning(2)
    ctx = pipe.encode_prompt(conds) if which == "text" else pipe.encode_class_labels(conds)
    assert _rel(ctx, c) < 1e-5
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for t in (999, 481, 1):
        ts = torch.full((2,), t)
        ref_eps = guided_eps(model_denoiser(model), x, ts, c, uc, 1.75)
        eps = pipe.denoise(x, ts, ctx, pipe.unconditional_context(2), 1.75)
        assert _rel(eps, ref_eps) < 1e-4
    ref, _ = DDIMSampler(model).sample(10, 2, (3, 8, 8), conditioning=c, x_T=x.clone(),
                                       unconditional_guidance_scale=1.75,
                                       unconditional_conditioning=uc, eta=0.0, verbose=False)
    kwargs = {"prompt": conds} if which == "text" else {"class_labels": conds}
    out = pipe(**kwargs, latents=x.clone(), num_inference_steps=10, guidance_scale=1.75,
               output_type="latent").images
    assert _rel(out, ref) < 1e-4
    assert _rel(pipe.decode_latents(out), model.decode_first_stage(ref)) < 1e-4
    # a wrong weight is caught: the comparison can fail
    bias = pipe.unet.conv_out.bias
    with torch.no_grad():
        bias.add_(0.05)
    wrong = pipe.denoise(x, ts, ctx, pipe.unconditional_context(2), 1.75)
    with torch.no_grad():
        bias.sub_(0.05)
    assert _rel(wrong, ref_eps) > 1e-3


def test_card_and_snippet_run_offline(text_export, snippet):
    """The card's metadata and sections; its three-line snippet ran offline in the folder."""
    _, folder = text_export
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-4.0\nlibrary_name: diffusers\n")
    for text in ("Not for diagnosis", "## Training configuration", "linear_start: 0.0015",
                 "ref_train.npz", "| train | train | 1.75 | 100 | 12.500 | 3.100 ± 0.400 |",
                 "@inproceedings{yellapragada2024pathldm", "trust_remote_code=True",
                 "(scripts/evaluate.py)", "31.250", '"seed": 0'):
        assert text in card, text
    assert len(snippet["code"].strip().splitlines()) == 3
    assert 'from_pretrained(".", trust_remote_code=True)' in snippet["code"]
    img = np.asarray(Image.open(snippet["image"]))
    assert img.shape == (16, 16, 3) and img.std() > 0
    info = json.loads((folder / "pathldm_export.json").read_text())
    assert (info["weights"], info["global_step"], info["conditioning"]) == ("ema", 7, "text")
    assert info["self_check_max_rel_err"] < 1e-4


ROUND_TRIP = ["--tumor", "high", "--til", "low", "--summary", "carcinoma", "--n", "2",
              "--steps", "4", "--seed", "5", "--device", "cpu"]


def _same_images(a: Path, b: Path) -> None:
    for name in ("00000.png", "00001.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))


def test_sample_round_trip(cases, tmp_path):
    """The folder loads back to the exact weights; sample.py --ckpt FOLDER samples it."""
    from ldm.export.folder import load_exported

    case = cases["text"]
    back = load_exported(case["folder"]).model.state_dict()
    ours = {k: v for k, v in case["model"].state_dict().items() if not k.startswith("model_ema")}
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    meta = load_script("sample").main(["--ckpt", str(case["folder"]), *ROUND_TRIP,
                                       "--outdir", str(tmp_path / "b")])
    assert len(list((tmp_path / "b").glob("0*.png"))) == 2
    assert meta["weights"] == "ema" and meta["global_step"] == 7
    assert meta["checkpoint"] == str(case["folder"].resolve())


def test_only_the_exporter_imports_diffusers():
    """diffusers stays optional: no project module outside the exporter imports it."""
    allowed = {ROOT / "ldm" / "export" / "exporter.py", *(ROOT / "ldm/export/templates").glob("*")}
    offenders = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("ldm/**/*.py"), *ROOT.glob("scripts/*.py"),
                 *ROOT.glob("data_prep/**/*.py"), *ROOT.glob("pathldm_app/**/*.py")]:
        text = path.read_text()
        if path not in allowed and re.search(r"^\s*(from|import) diffusers", text, re.M):
            offenders.append(path.relative_to(ROOT))
    assert offenders == []


@pytest.mark.slow
def test_sample_round_trip_without_diffusers(text_export, tmp_path):
    """The round trip in a fresh interpreter where diffusers cannot be imported."""
    run, folder = text_export
    load_script("sample").main(["--ckpt", str(run), *ROUND_TRIP, "--outdir",
                                str(tmp_path / "a")])
    code = ("import sys; sys.modules['diffusers'] = None; "
            f"sys.path.insert(0, {str(ROOT / 'scripts')!r}); import sample; "
            f"sample.main(sys.argv[1:])")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-c", code, "--ckpt", str(folder), *ROUND_TRIP,
                    "--outdir", str(tmp_path / "b")], env=env, check=True, capture_output=True,
                   timeout=600)
    _same_images(tmp_path / "a", tmp_path / "b")


def test_class_folder_layout(class_export):
    """Class models ship the custom class embedder; raw weights were taken with --no-ema."""
    run, folder = class_export
    index = json.loads((folder / "model_index.json").read_text())
    assert index["class_embedder"] == ["class_embedder", "PathLDMClassEmbedder"]
    assert index["text_encoder"] == [None, None] and index["vae"] == ["diffusers", "VQModel"]
    assert (folder / "class_embedder" / "class_embedder.py").is_file()
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["steps_offset"]) == (
        "scaled_linear", 0.0015, 1)
    assert json.loads((folder / "pathldm_export.json").read_text())["weights"] == "raw"
    assert "class_labels=[2]" in (folder / "README.md").read_text()
    # the killed export's temporary folder is gone, the live one's is not touched
    assert [p.name for p in folder.parent.glob(".out.*")] == [f".out.{os.getppid()}.tmp"]


def test_export_refuses_and_keeps_existing(class_export, tmp_path):
    """A non-empty --out is kept unless --overwrite; unexportable settings name themselves."""
    from ldm.export.configs import unet_config, vae_config
    from ldm.export.exporter import conditioning

    run, _ = class_export
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    export = load_script("export")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.main(["--ckpt", str(run), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="ch_mult"):
        vae_config({"embed_dim": 3, "n_embed": 8, "ddconfig": {"ch_mult": [2, 2]}}, "vq", 1.0)
    with pytest.raises(ValueError, match="attn_resolutions"):
        keymap.vae_table({"ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [8]})
    with pytest.raises(ValueError, match="resblock_updown=True"):
        unet_config({"use_spatial_transformer": True, "resblock_updown": True}, None)
    with pytest.raises(ValueError, match="only the transformers CLIP/PLIP text encoder"):
        conditioning(torch.nn.Module())


def test_missing_diffusers_names_the_extra(monkeypatch):
    """Without diffusers the exporter says which extra to install."""
    from ldm.export.exporter import _require_diffusers
    from ldm.optional import MissingExtraError

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingExtraError, match=r'pathldm\[export\]'):
        _require_diffusers()


def test_kl_first_stage_exports_as_autoencoder_kl(tmp_path):
    """The KL ablation: AutoencoderKL with the LDM's scale factor; decode and denoiser match."""
    from ldm.export.exporter import ExportOptions, export_model
    from ldm.export.folder import load_exported

    cfg = tiny_model_config(None)
    cfg["params"]["scale_factor"] = 0.5
    cfg["params"]["first_stage_config"] = {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 3, "ddconfig": {**DDCONFIG, "double_z": True},
                   "lossconfig": {"target": "torch.nn.Identity"}}}
    run = _run_dir(tmp_path, cfg, seed=4)
    loaded = load_model(run)
    export_model(loaded, tmp_path / "out", ExportOptions())
    pipe = _pipe(tmp_path / "out")
    assert type(pipe.vae).__name__ == "AutoencoderKL" and pipe.vae.config.scaling_factor == 0.5
    model = loaded.model
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    assert _rel(pipe.decode_latents(z), model.decode_first_stage(z)) < 1e-4
    labels = [0, 3]
    c = model.get_conditioning(conditioning_batch(labels))
    ts = torch.tensor([700, 20])
    ref = model.apply_model(z, ts, c)
    assert _rel(pipe.denoise(z, ts, pipe.encode_class_labels(labels)), ref) < 1e-4
    back = load_exported(tmp_path / "out").model.state_dict()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema")}
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
