"""DDIM (and PLMS) sampling against the CompVis/PathLDM reference (fixture F4)."""
import numpy as np
import pytest
import torch
from conftest import load_fixture

from ldm.models.diffusion import ddim as ddim_mod
from ldm.models.diffusion.ddim import DDIMSampler, DDIMSchedule, cat_cond, sample_ddim
from ldm.models.diffusion.plms import PLMSSampler, sample_plms
from ldm.models.diffusion.schedule import DiffusionSchedule
from ldm.util import instantiate_from_config

FIXTURE = "F3F4_ldm_schedule_loss_ddim_s0"
CASES = ["cfg1.75_eta0_S10", "cfg1.75_eta0_S10_uncond_separate", "nocfg_eta0_S10",
         "cfg1.75_eta1_S10", "cfg1.75_eta0_S7"]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def f4():
    fx = load_fixture(FIXTURE)
    model = instantiate_from_config(fx["config"])
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    inp, out = fx["inputs"]["F4"], fx["outputs"]["F4"]
    c = model.get_learned_conditioning({"class_label": inp["class_label"]})
    uc = model.get_learned_conditioning({"class_label": inp["uc_class_label"]})
    return model, inp, out, c, uc


def _run(model, inp, c, uc, case, monkeypatch=None, record=None):
    if record is not None:
        real = ddim_mod.noise_like

        def recording(shape, device, repeat=False):
            n = real(shape, device, repeat)
            record.append(n)
            return n

        monkeypatch.setattr(ddim_mod, "noise_like", recording)
    scale = case["scale"]
    torch.manual_seed(case["torch_seed"])
    return DDIMSampler(model).sample(
        S=case["S"], batch_size=2, shape=[3, 8, 8], conditioning=c, eta=case["eta"],
        unconditional_guidance_scale=scale, unconditional_conditioning=uc if scale != 1 else None,
        x_T=inp["x_T"], log_every_t=1, verbose=False,
        sample_uncond_separate=case.get("sample_uncond_separate", False))


def test_conditioning_matches_reference(f4):
    _, _, out, c, uc = f4
    assert torch.equal(c, out["c"]) and torch.equal(uc, out["uc"])


@pytest.mark.parametrize("name", CASES)
def test_ddim_matches_reference(f4, name, monkeypatch):
    model, inp, out, c, uc = f4
    case, ref = inp["cases"][name], out[name]
    noises = []
    samples, inter = _run(model, inp, c, uc, case, monkeypatch, noises)
    n_steps = len(ref["ddim"]["ddim_timesteps"])
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == n_steps + 1
    assert torch.equal(inter["x_inter"][0], inp["x_T"])
    assert rel(torch.stack(inter["x_inter"]), ref["x_inter"]) <= 1e-4
    assert rel(torch.stack(inter["pred_x0"]), ref["pred_x0"]) <= 1e-4
    assert rel(samples, ref["samples"]) <= 1e-4
    # one randn(x.shape) per step from the global RNG, even at eta = 0
    assert torch.equal(torch.stack(noises), ref["noise_per_step"])
    if case.get("decode"):
        assert rel(model.decode_first_stage(samples), ref["decode_first_stage"]) <= 1e-5


@pytest.mark.parametrize("name", ["cfg1.75_eta1_S10", "cfg1.75_eta0_S7"])
def test_ddim_parameters_exact_with_reference_types(f4, name):
    model, inp, out, _, _ = f4
    case, ref = inp["cases"][name], out[name]
    sampler = DDIMSampler(model)
    sampler.make_schedule(case["S"], ddim_eta=case["eta"], verbose=False)
    assert isinstance(sampler.ddim_timesteps, np.ndarray)
    assert sampler.ddim_timesteps.tolist() == ref["ddim"]["ddim_timesteps"].tolist()
    assert isinstance(sampler.ddim_alphas_prev, np.ndarray)
    assert sampler.ddim_alphas_prev.dtype == np.float64
    assert np.array_equal(sampler.ddim_alphas_prev, ref["ddim"]["ddim_alphas_prev"].numpy())
    for key in ("ddim_alphas", "ddim_sigmas", "ddim_sqrt_one_minus_alphas"):
        value = getattr(sampler, key)
        assert value.dtype == ref["ddim"][key].dtype and torch.equal(value, ref["ddim"][key]), key
    assert ref["ddim_types"]["ddim_sigmas"] == "torch.Tensor:torch.float64"


def test_uncond_separate_close_to_batched(f4):
    model, inp, _, c, uc = f4
    case = dict(inp["cases"]["cfg1.75_eta0_S10"])
    batched, _ = _run(model, inp, c, uc, case)
    separate, _ = _run(model, inp, c, uc, {**case, "sample_uncond_separate": True})
    assert rel(separate, batched) <= 1e-5


def test_log_every_t_and_default_noise(f4):
    model, _, _, c, uc = f4
    torch.manual_seed(0)
    samples, inter = DDIMSampler(model).sample(10, 2, (3, 8, 8), conditioning=c, verbose=False,
                                               unconditional_guidance_scale=1.75,
                                               unconditional_conditioning=uc)
    # x_T, the first step and index 0 (log_every_t=100 with 10 steps)
    assert len(inter["x_inter"]) == 3 and torch.equal(inter["x_inter"][-1], samples)
    assert torch.isfinite(samples).all()


def _point_mass(x0: torch.Tensor, sched: DiffusionSchedule):
    """Exact eps-denoiser of data concentrated at ``x0``."""
    def denoiser(x, t, cond):
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return denoiser


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_exact_denoiser_recovers_data(sampler):
    sched = DiffusionSchedule.make("linear", 1000, 0.0015, 0.0195)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 2, 4, 4, generator=g).expand(3, -1, -1, -1)
    x_T = torch.randn(3, 2, 4, 4, generator=g)
    ddim = DDIMSchedule.make(sched.alphas_cumprod, 20, eta=0.0)
    run = sample_ddim if sampler == "ddim" else sample_plms
    out, inter = run(_point_mass(x0, sched), x_T, ddim, log_every_t=1)
    for pred in inter["pred_x0"][1:]:
        torch.testing.assert_close(pred, x0, atol=1e-4, rtol=0)
    # with the exact eps the deterministic update keeps eps constant along the trajectory
    a_T, a_0 = sched.alphas_cumprod[int(ddim.timesteps[-1])], sched.alphas_cumprod[0]
    eps = (x_T - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    torch.testing.assert_close(out, a_0.sqrt() * x0 + (1 - a_0).sqrt() * eps, atol=1e-4, rtol=0)


def test_plms_sampler_runs_with_guidance(f4):
    model, _, _, c, uc = f4
    torch.manual_seed(0)
    samples, inter = PLMSSampler(model).sample(5, 2, (3, 8, 8), conditioning=c, verbose=False,
                                               unconditional_guidance_scale=1.75,
                                               unconditional_conditioning=uc, log_every_t=1)
    assert samples.shape == (2, 3, 8, 8) and len(inter["pred_x0"]) == 6
    assert torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="eta=0"):
        PLMSSampler(model).sample(5, 2, (3, 8, 8), conditioning=c, eta=1.0, verbose=False)


def test_cat_cond_handles_hybrid_dicts():
    u, c = torch.zeros(2, 1, 4), torch.ones(2, 1, 4)
    out = cat_cond({"c_concat": [u], "c_crossattn": [u]}, {"c_concat": [c], "c_crossattn": [c]})
    assert out["c_concat"][0].shape == (4, 1, 4)
    assert torch.equal(out["c_crossattn"][0][:2], u) and torch.equal(out["c_crossattn"][0][2:], c)


@pytest.mark.gpu
def test_ddim_on_cuda_matches_cpu(f4):
    model, inp, out, c, uc = f4
    case = inp["cases"]["cfg1.75_eta0_S10"]
    model_cuda = model.to("cuda")
    try:
        torch.manual_seed(0)
        samples, _ = DDIMSampler(model_cuda).sample(
            10, 2, (3, 8, 8), conditioning=c.cuda(), unconditional_conditioning=uc.cuda(),
            unconditional_guidance_scale=case["scale"], x_T=inp["x_T"].cuda(), verbose=False)
        assert samples.device.type == "cuda"
        assert rel(samples.cpu(), out["cfg1.75_eta0_S10"]["samples"]) <= 1e-3
    finally:
        model.to("cpu")
