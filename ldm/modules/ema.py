"""Exponential moving average of a module's parameters, kept as buffers (CompVis ``LitEma``)."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)


class LitEma(nn.Module):
    """EMA of the trainable parameters of ``model``, stored as buffers of this module.

    Shadow buffers are named after the parameter with dots removed (``'a.b.weight'`` ->
    ``'abweight'``), so a parent module's state_dict holds ``model_ema.abweight`` exactly as
    CompVis checkpoints do. Only parameters with ``requires_grad`` at construction are tracked;
    buffers are not. With ``use_num_upates`` (sic, the CompVis spelling) the decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` where ``n`` is incremented before use; otherwise
    ``num_updates`` stays -1 and the decay is constant. All arithmetic is float32 tensor math.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999,
                 use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates",
                             torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")  # '.' is not allowed in buffer names
                if s_name in self.m_name2s_name.values():
                    raise ValueError(f"EMA shadow name {s_name!r} of parameter {name!r} collides "
                                     "with another parameter's")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def _tracked(self, model: nn.Module) -> Iterable[tuple[nn.Parameter, torch.Tensor]]:
        """Pairs (parameter, shadow) for the model's currently trainable parameters."""
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name not in self.m_name2s_name:
                raise KeyError(f"parameter {name!r} is trainable but was not trainable when the "
                               "EMA was created, so it has no shadow copy")
            yield p, shadows[self.m_name2s_name[name]]

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update: ``shadow -= (1 - decay) * (shadow - param)``."""
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            # int32 / int32 is a float32 tensor; min() keeps whichever tensor is smaller
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        for p, shadow in self._tracked(model):
            shadow.sub_(one_minus_decay * (shadow - p.to(shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with the EMA values."""
        for p, shadow in self._tracked(model):
            p.copy_(shadow)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save copies of ``parameters`` for :meth:`restore`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the values saved by :meth:`store` (e.g. after evaluating with EMA weights)."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise RuntimeError(f"restore() got {len(parameters)} parameters but store() saved "
                               f"{len(self.collected_params)}")
        for c_param, param in zip(self.collected_params, parameters):
            param.copy_(c_param)
        self.collected_params = []  # release the copy (it is as large as the model)

    @contextmanager
    def swapped_in(self, model: nn.Module, context: str | None = None) -> Iterator[None]:
        """Use the EMA weights in ``model`` inside the block, the training weights after it."""
        self.store(model.parameters())
        self.copy_to(model)
        if context is not None:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            self.restore(model.parameters())
            if context is not None:
                logger.info("%s: restored training weights", context)
