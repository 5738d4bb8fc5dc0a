"""``ldm.optim.adamw``: fused AdamW where possible, numerically the plain AdamW update."""
import io

import pytest
import torch
from torch import nn

from ldm.optim import adamw, fused_adamw_supported

SHAPES = [(48, 32), (32,), (8, 3, 3, 3), (1000,)]


def _train(make_opt, n_steps=6, weight_decay=1e-2, seed=0):
    """Params and optimizer after ``n_steps`` with a fixed sequence of gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(n_steps)]
    opt = make_opt(params, weight_decay)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad()
    return params, opt


def _plain(params, wd):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=wd, foreach=False)


def _ours(params, wd):
    return adamw(params, lr=1e-2, weight_decay=wd)


def test_picks_fused_on_cpu_floating_point_params():
    opt = adamw([nn.Parameter(torch.zeros(3))], lr=1e-3)
    assert opt.param_groups[0]["fused"] is True
    assert opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_matches_plain_adamw_over_several_steps(weight_decay):
    ref_params, ref_opt = _train(_plain, weight_decay=weight_decay)
    params, opt = _train(_ours, weight_decay=weight_decay)
    assert opt.param_groups[0]["fused"] is True
    for p_ref, p in zip(ref_params, params):
        # the fused kernel orders the final multiply-adds differently: agreement to rounding
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, p.new_zeros(p.shape))
        s_ref, s = ref_opt.state[p_ref], opt.state[p]
        assert torch.equal(s["exp_avg"], s_ref["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], s_ref["exp_avg_sq"])
        assert float(s["step"]) == float(s_ref["step"]) == 6.0


def test_resumes_from_a_plain_adamw_state_dict():
    """A checkpoint of the plain optimizer continues identically under the fused one."""
    ref_params, ref_opt = _train(_plain, n_steps=3)
    params = [nn.Parameter(p.detach().clone()) for p in ref_params]
    opt = adamw(params, lr=1e-2, weight_decay=1e-2)
    buf = io.BytesIO()  # a checkpoint round trip, so the two optimizers share no state tensors
    torch.save(ref_opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    opt.param_groups[0]["fused"] = True  # load_state_dict restores the saved group's flags
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p_ref, p in zip(ref_params, params):
            g = torch.randn(p.shape, generator=gen)
            p_ref.grad, p.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    for p_ref, p in zip(ref_params, params):
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)


def test_parameter_groups_keep_their_options():
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(2))
    opt = adamw([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    assert all(g["fused"] for g in opt.param_groups)


def test_explicit_choice_is_respected():
    p = [nn.Parameter(torch.zeros(3))]
    assert not adamw(p, lr=1e-3, fused=False).param_groups[0]["fused"]
    assert not adamw(p, lr=1e-3, prefer_fused=False).param_groups[0]["fused"]
    opt = adamw(p, lr=1e-3, foreach=True)
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]


def test_falls_back_when_a_parameter_is_unsupported():
    meta = nn.Parameter(torch.empty(3, device="meta"))
    assert not fused_adamw_supported([meta])
    assert not fused_adamw_supported([])
    assert not fused_adamw_supported([torch.zeros(3, dtype=torch.int64)])
    opt = adamw([nn.Parameter(torch.zeros(3)), meta], lr=1e-3)
    assert not opt.param_groups[0]["fused"]
