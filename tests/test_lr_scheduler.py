"""Learning-rate multiplier schedules (CompVis semantics), checked by hand."""
import logging
import math

import pytest
import torch

from ldm.lr_scheduler import (
    LambdaLinearScheduler,
    LambdaWarmUpCosineScheduler,
    LambdaWarmUpCosineScheduler2,
)


def test_linear_warm_up_then_constant_as_pathldm():
    s = LambdaLinearScheduler(warm_up_steps=[1000], f_start=[1e-6], f_max=[1.0], f_min=[1.0],
                              cycle_lengths=[10000000000000])
    assert s.schedule(0) == pytest.approx(1e-6)
    assert s(500) == pytest.approx(1e-6 + (1.0 - 1e-6) * 0.5)
    assert s(999) == pytest.approx(1e-6 + (1.0 - 1e-6) * 0.999)
    assert s(1000) == 1.0 and s(10 ** 7) == 1.0
    assert s.last_f == 1.0


def test_linear_decay_and_cycles():
    s = LambdaLinearScheduler(warm_up_steps=[10, 0], f_start=[0.0, 1.0], f_max=[1.0, 1.0],
                              f_min=[0.5, 0.0], cycle_lengths=[100, 50])
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(0.5 + 0.5 * 90 / 100)
    assert s(100) == pytest.approx(0.5)
    # second cycle starts after step 100: n=101 -> n'=1 of 50
    assert s(101) == pytest.approx(0.0 + 1.0 * 49 / 50)
    assert s(150) == pytest.approx(0.0)
    assert s(1000) == pytest.approx(0.0)  # past the last cycle: hold f_min


def test_cosine_schedulers():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0,
                                    max_decay_steps=110)
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert s(110) == pytest.approx(0.1) and s(10 ** 6) == pytest.approx(0.1)
    s2 = LambdaWarmUpCosineScheduler2(warm_up_steps=[10], f_min=[0.0], f_max=[2.0],
                                      f_start=[0.0], cycle_lengths=[110])
    assert s2(5) == pytest.approx(1.0) and s2(60) == pytest.approx(1.0)
    assert s2(110) == pytest.approx(0.0)


def test_with_lambda_lr_and_verbosity(caplog):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    s = LambdaLinearScheduler(warm_up_steps=[4], f_start=[0.0], f_max=[1.0], f_min=[1.0],
                              cycle_lengths=[100], verbosity_interval=2)
    with caplog.at_level(logging.INFO, logger="ldm.lr_scheduler"):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=s.schedule)
        lrs = []
        for _ in range(5):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert any("current step: 2" in r.message for r in caplog.records)


def test_mismatched_cycle_lists_raise():
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(warm_up_steps=[1, 2], f_start=[0.0], f_max=[1.0], f_min=[1.0],
                              cycle_lengths=[10])
    with pytest.raises(ValueError, match="max_decay_steps"):
        LambdaWarmUpCosineScheduler(10, 0.0, 1.0, 0.0, max_decay_steps=5)
