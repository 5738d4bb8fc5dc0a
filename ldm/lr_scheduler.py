"""Learning-rate multiplier schedules for ``torch.optim.lr_scheduler.LambdaLR`` (CompVis).

Each scheduler's ``schedule(n)`` (also ``__call__``) returns the factor applied to the base
learning rate at optimizer step ``n``; use it with ``LambdaLR(opt, lr_lambda=s.schedule)``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def _as_list(value: float | int | Sequence[float | int], name: str) -> list:
    if isinstance(value, (int, float)):
        return [value]
    value = list(value)
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max``, then cosine decay to ``lr_min``.

    Use with a base learning rate of 1.0: the returned values are learning rates.
    """

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                 max_decay_steps: int, verbosity_interval: int = 0) -> None:
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps "
                             f"({warm_up_steps})")
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs) -> float:
        """Learning rate at step ``n``."""
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %s", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            t = min(t, 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + np.cos(t * np.pi))
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, each a linear warm-up ``f_start -> f_max`` then cosine decay to ``f_min``.

    Every argument is a list with one entry per cycle (a scalar means one cycle);
    ``cycle_lengths`` are the cycle lengths in steps.
    """

    def __init__(self, warm_up_steps: Sequence[int] | int, f_min: Sequence[float] | float,
                 f_max: Sequence[float] | float, f_start: Sequence[float] | float,
                 cycle_lengths: Sequence[int] | int, verbosity_interval: int = 0) -> None:
        self.lr_warm_up_steps = _as_list(warm_up_steps, "warm_up_steps")
        self.f_start = _as_list(f_start, "f_start")
        self.f_min = _as_list(f_min, "f_min")
        self.f_max = _as_list(f_max, "f_max")
        self.cycle_lengths = _as_list(cycle_lengths, "cycle_lengths")
        lengths = {len(v) for v in (self.lr_warm_up_steps, self.f_start, self.f_min, self.f_max,
                                    self.cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one "
                             f"entry per cycle; got lengths {sorted(lengths)}")
        self.cum_cycles = np.cumsum([0] + list(self.cycle_lengths))
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle containing step ``n`` (the last one past the end)."""
        for interval, cl in enumerate(self.cum_cycles[1:]):
            if n <= cl:
                return interval
        return len(self.cycle_lengths) - 1

    def _start(self, n: int) -> tuple[int, int]:
        cycle = self.find_in_interval(n)
        n = n - int(self.cum_cycles[cycle])
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %s, current cycle %d",
                        n, self.last_f, cycle)
        return cycle, n

    def _warm_up(self, cycle: int, n: int) -> float:
        return ((self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n
                + self.f_start[cycle])

    def schedule(self, n: int, **kwargs) -> float:
        """Learning-rate multiplier at step ``n``."""
        cycle, n = self._start(n)
        if n < self.lr_warm_up_steps[cycle]:
            f = self._warm_up(cycle, n)
        else:
            t = ((n - self.lr_warm_up_steps[cycle])
                 / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]))
            t = min(t, 1.0)
            f = (self.f_min[cycle]
                 + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + np.cos(t * np.pi)))
        self.last_f = f
        return f

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Per cycle: linear warm-up ``f_start -> f_max``, then linear decay towards ``f_min``.

    PathLDM uses ``warm_up_steps=[1000], f_start=[1e-6], f_max=[1.0], f_min=[1.0],
    cycle_lengths=[1e13]``: a warm-up from ``1e-6`` to the base LR, then constant.
    """

    def schedule(self, n: int, **kwargs) -> float:
        """Learning-rate multiplier at step ``n``."""
        cycle, n = self._start(n)
        if n < self.lr_warm_up_steps[cycle]:
            f = self._warm_up(cycle, n)
        else:
            # past the last cycle hold f_min (CompVis fails there)
            n = min(n, self.cycle_lengths[cycle])
            f = (self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle])
                 * (self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle])
        self.last_f = f
        return f
