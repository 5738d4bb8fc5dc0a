"""LitEma against the reference fixtures (F6) and its CompVis conventions."""
import pytest
import torch
from conftest import load_fixture

from ldm.modules.ema import LitEma


def _net_from_fixture(fx):
    cfg = fx["config"]
    net = torch.nn.Sequential(*[getattr(torch.nn, m[0])(*m[1:]) for m in cfg["module"]])
    for name, p in net.named_parameters():
        if name in cfg["frozen"]:
            p.requires_grad_(False)
    net.load_state_dict(fx["inputs"]["initial_params"])
    return net


@pytest.mark.parametrize("name", ["F6_litema_decay0.9999_s0", "F6_litema_decay0.9_nonum_s1"])
def test_litema_matches_reference_exactly(name):
    fx = load_fixture(name)
    out = fx["outputs"]
    net = _net_from_fixture(fx)
    ema = LitEma(net, **fx["config"]["params"])
    assert list(ema.state_dict()) == out["buffer_names"]
    assert ema.m_name2s_name == out["m_name2s_name"]
    for k, v in out["initial_ema_state_dict"].items():
        assert torch.equal(ema.state_dict()[k], v), k
    for i, params in enumerate(fx["inputs"]["param_sequence"]):
        with torch.no_grad():
            for pname, p in net.named_parameters():
                if pname in params:
                    p.copy_(params[pname])
        ema(net)
        assert int(ema.num_updates) == out["num_updates_after_each_update"][i]
        ref = out["ema_state_dict_after_each_update"][i]
        sd = ema.state_dict()
        for k, v in ref.items():
            assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), (i, k)
    ema.store(net.parameters())
    ema.copy_to(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, out["params_after_copy_to"][k]), k
    ema.restore(net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, out["params_after_restore"][k]), k


def test_warm_up_decay_and_buffers_not_tracked():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = LitEma(net, decay=0.9999)
    assert set(ema.m_name2s_name.values()) == {"0weight", "0bias", "1weight", "1bias"}
    assert "1running_mean" not in ema.state_dict()
    assert ema.decay.dtype == torch.float32 and ema.num_updates.dtype == torch.int32
    before = ema.state_dict()["0weight"].clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema(net)
    # first update: n = 1, decay = min(0.9999, 2/11), so the shadow moves 9/11 of the way
    torch.testing.assert_close(ema.state_dict()["0weight"], before + 9 / 11)


def test_restore_requires_store_of_same_length():
    net = torch.nn.Linear(2, 2)
    ema = LitEma(net)
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(net.parameters())
    with pytest.raises(ValueError, match="between 0 and 1"):
        LitEma(net, decay=1.5)
