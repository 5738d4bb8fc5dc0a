"""Diffusion schedule math against the CompVis reference (fixture F3) and by hand."""
import numpy as np
import pytest
import torch
from conftest import load_fixture

from ldm.models.diffusion import schedule as S


@pytest.fixture(scope="module")
def f3():
    fx = load_fixture("F3F4_ldm_schedule_loss_ddim_s0")
    return fx["config"]["params"], fx["inputs"]["F3"], fx["outputs"]["F3"]


def _assert_exact(buffers, ref):
    for name in (*S.SCHEDULE_BUFFERS, "lvlb_weights"):
        assert buffers[name].dtype == torch.float32, name
        assert torch.equal(buffers[name], ref[name]), name


def test_linear_schedule_buffers_match_reference_exactly(f3):
    params, _, out = f3
    betas = S.make_beta_schedule("linear", params["timesteps"], params["linear_start"],
                                 params["linear_end"])
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    _assert_exact(S.schedule_buffers(betas), out["schedule"])
    assert torch.equal(out["schedule"]["logvar"], torch.zeros(1000))


def test_cosine_schedule_buffers_match_reference_exactly(f3):
    _, inp, out = f3
    alt = inp["alt_schedules"]["cosine_1000"]
    sched = S.DiffusionSchedule.make(alt["beta_schedule"], alt["timesteps"],
                                     cosine_s=alt["cosine_s"])
    _assert_exact(vars(sched), out["alt_schedules"]["cosine_1000"])
    assert sched.num_timesteps == 1000


def test_schedule_values_by_hand():
    betas = S.make_beta_schedule("linear", 4, linear_start=1e-4, linear_end=4e-4)
    np.testing.assert_allclose(betas, np.linspace(1e-2, 2e-2, 4) ** 2, rtol=1e-14)
    np.testing.assert_allclose(S.make_beta_schedule("sqrt_linear", 3, 0.1, 0.3), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(S.make_beta_schedule("sqrt", 3, 0.1, 0.3),
                               np.sqrt([0.1, 0.2, 0.3]))
    arrays = S.schedule_arrays(betas)
    ac = np.cumprod(1 - betas)
    np.testing.assert_allclose(arrays["alphas_cumprod_prev"], [1.0, *ac[:-1]])
    np.testing.assert_allclose(arrays["posterior_variance"][1:],
                               betas[1:] * (1 - ac[:-1]) / (1 - ac[1:]))
    assert arrays["posterior_variance"][0] == 0
    assert arrays["posterior_log_variance_clipped"][0] == pytest.approx(np.log(1e-20))
    # v_posterior=1 gives the beta_t variance
    np.testing.assert_allclose(S.schedule_arrays(betas, v_posterior=1.0)["posterior_variance"],
                               betas)


def test_lvlb_weights_eps_and_x0():
    sched = S.DiffusionSchedule.make("linear", 10, 1e-3, 2e-2)
    w = sched.lvlb_weights
    expected = (sched.betas.double() ** 2 / (2 * sched.posterior_variance.double()
                * (1 - sched.betas.double()) * (1 - sched.alphas_cumprod.double())))
    torch.testing.assert_close(w[1:].double(), expected[1:], rtol=1e-5, atol=0)
    assert w[0] == w[1]
    w0 = S.DiffusionSchedule.make("linear", 10, 1e-3, 2e-2, parameterization="x0").lvlb_weights
    ac = sched.alphas_cumprod
    torch.testing.assert_close(w0[1:], (0.5 * ac.sqrt() / (2.0 - ac))[1:])


def test_q_sample_matches_reference_without_lightning(f3):
    params, inp, out = f3
    sched = S.DiffusionSchedule.make("linear", 1000, params["linear_start"], params["linear_end"])
    for name, case in inp["cases"].items():
        xt = S.q_sample(sched, case["x0"], case["t"], noise=case["noise"])
        assert torch.equal(xt, out["cases"][name]["q_sample"]), name


def test_posterior_and_inversions():
    sched = S.DiffusionSchedule.make("linear", 1000, 0.0015, 0.0195)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 10, 999])
    xt = S.q_sample(sched, x0, t, noise)
    torch.testing.assert_close(S.predict_start_from_noise(sched, xt, t, noise), x0,
                               atol=2e-4, rtol=0)
    torch.testing.assert_close(S.predict_eps_from_start(sched, xt, t[1:2].expand(3), x0)[1],
                               noise[1], atol=1e-4, rtol=0)
    mean, var, logvar = S.q_posterior(sched, x0, xt, t)
    ac = sched.alphas_cumprod.double()
    ac_prev, beta = sched.alphas_cumprod_prev.double(), sched.betas.double()
    c1 = (ac_prev.sqrt() * beta / (1 - ac))[t].view(3, 1, 1, 1)
    c2 = ((1 - beta).sqrt() * (1 - ac_prev) / (1 - ac))[t].view(3, 1, 1, 1)
    torch.testing.assert_close(mean.double(), c1 * x0.double() + c2 * xt.double(),
                               atol=1e-5, rtol=1e-5)
    assert var.shape == (3, 1, 1, 1) and var[0].item() == 0.0
    assert torch.equal(logvar.flatten(), sched.posterior_log_variance_clipped[t])
    m, v, lv = S.q_mean_variance(sched, x0, t)
    torch.testing.assert_close(v.flatten(), 1 - sched.alphas_cumprod[t])


def test_extract_into_tensor_shape():
    a = torch.arange(10.0)
    out = S.extract_into_tensor(a, torch.tensor([3, 7]), (2, 3, 5, 5))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [3.0, 7.0]


def test_ddim_timesteps():
    assert S.make_ddim_timesteps("uniform", 10, 1000).tolist() == list(range(1, 1000, 100))
    s50 = S.make_ddim_timesteps("uniform", 50, 1000)
    assert len(s50) == 50 and s50[0] == 1 and s50[-1] == 981 and s50.dtype == np.int64
    # 1000 // 7 = 142 gives 8 steps, as the reference
    assert S.make_ddim_timesteps("uniform", 7, 1000).tolist() == [1 + 142 * i for i in range(8)]
    # 1000 // 3 = 333 would end at step 1000 (out of range in the reference): dropped
    assert S.make_ddim_timesteps("uniform", 3, 1000).tolist() == [1, 334, 667]
    quad = S.make_ddim_timesteps("quad", 5, 1000)
    expected = (np.linspace(0, np.sqrt(800), 5) ** 2).astype(int) + 1
    assert quad.tolist() == expected.tolist()
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="DDIM steps"):
            S.make_ddim_timesteps("uniform", bad, 1000)
    with pytest.raises(ValueError, match="ddim_discretize"):
        S.make_ddim_timesteps("log", 10, 1000)


def test_ddim_sampling_parameters_types_and_values():
    sched = S.DiffusionSchedule.make("linear", 1000, 0.0015, 0.0195)
    steps = S.make_ddim_timesteps("uniform", 10, 1000)
    sigmas, alphas, alphas_prev = S.make_ddim_sampling_parameters(sched.alphas_cumprod, steps, 1.0)
    assert alphas.dtype == torch.float32 and sigmas.dtype == torch.float64
    assert isinstance(alphas_prev, np.ndarray) and alphas_prev.dtype == np.float64
    assert alphas_prev[0] == sched.alphas_cumprod[0].item()  # not 1.0
    assert alphas_prev[1:].tolist() == sched.alphas_cumprod[steps[:-1]].tolist()
    a, ap = alphas.double().numpy(), alphas_prev
    np.testing.assert_allclose(sigmas.numpy(), np.sqrt((1 - ap) / (1 - a) * (1 - a / ap)),
                               rtol=1e-6)
    sig0 = S.make_ddim_sampling_parameters(sched.alphas_cumprod, steps, 0.0)[0]
    assert torch.count_nonzero(sig0) == 0


def test_noise_like_repeat():
    torch.manual_seed(3)
    n = S.noise_like((4, 2, 3), "cpu", repeat=True)
    assert torch.equal(n[0], n[3])
    assert S.noise_like((4, 2, 3), None).shape == (4, 2, 3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="beta_schedule 'exp'"):
        S.make_beta_schedule("exp", 10)
    with pytest.raises(ValueError, match="parameterization 'v'"):
        S.schedule_buffers(S.make_beta_schedule("linear", 10), parameterization="v")
    with pytest.raises(ValueError, match="1-D"):
        S.schedule_arrays(np.zeros((2, 2)))
