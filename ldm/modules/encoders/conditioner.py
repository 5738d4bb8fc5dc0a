"""Several conditioning embedders in one module, in the spirit of sgm's ``GeneralConditioner``.

Each embedder reads its own field of a batch-like dict (``input_key``), owns its classifier-free-
guidance dropout (``ucg_rate``: a dropped sample gets the embedder's unconditional input, as DiT's
``LabelEmbedder.token_drop`` does), may be trainable, and says how its output reaches the U-Net
(``kind``): ``crossattn`` tokens ``(B, L, D)`` (concatenated along the sequence into
``c_crossattn``), a ``vector`` ``(B, D)`` added to the time embedding through the U-Net's
``label_emb`` (summed or concatenated into ``y``), or ``concat`` channels ``(B, C, H, W)``
(concatenated along the channels into ``c_concat``).

Config::

    cond_stage_config:
      target: ldm.modules.encoders.conditioner.Conditioner
      params:
        vector_combine: sum            # or concat
        embedders:                     # a mapping (names in the state-dict keys) or a list
          levels:
            target: ldm.modules.encoders.modules.ClassEmbedder
            params: {embed_dim: 128, n_classes: 5, key: class_label}
            input_key: class_label
            kind: vector
            ucg_rate: 0.1
          text:
            target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
            params: {version: openai/clip-vit-base-patch32, max_length: 154}
            input_key: summary
            kind: crossattn
            ucg_rate: 0.1

An overlay or a ``key=value`` override reaches an embedder by name
(``model.params.cond_stage_config.params.embedders.text.params.version=DIR``); a list's
embedders are named ``0``, ``1``, ... (sgm's ``emb_models`` layout). State-dict keys are
``cond_stage_model.embedders.<name>.*``.

A single embedder given directly as ``cond_stage_config`` (every CompVis/PathLDM config) is seen
through a :class:`SingleEmbedderView`: the same conditioning code, while the embedder stays the
model's ``cond_stage_model`` (state-dict keys ``cond_stage_model.*``).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.data.captions import drop_decisions, levels_from_caption
from ldm.util import instantiate_from_config

KINDS = ("crossattn", "vector", "concat")
# where each kind goes in the DiffusionWrapper's keyword arguments
UNET_KEYS = {"crossattn": "c_crossattn", "vector": "y", "concat": "c_concat"}
VECTOR_COMBINES = ("sum", "concat")
SPEC_KEYS = ("input_key", "kind", "ucg_rate", "is_trainable", "legacy_til_exemption",
             "method")


def configure_embedder(module: nn.Module, input_key: str, kind: str = "crossattn",
                       ucg_rate: float = 0.0, is_trainable: bool = False,
                       legacy_til_exemption: bool = False, method: str | None = None
                       ) -> nn.Module:
    """Give ``module`` the attributes the :class:`Conditioner` reads (checked).

    ``method`` names the method that encodes (CompVis ``cond_stage_forward``); by default
    ``encode`` where the module has one, else its forward.
    """
    if method is not None and not callable(getattr(module, method, None)):
        raise AttributeError(f"{type(module).__name__} has no method {method!r} to encode with")
    if kind not in KINDS:
        raise ValueError(f"embedder kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= float(ucg_rate) <= 1.0:
        raise ValueError(f"ucg_rate must be in [0, 1], got {ucg_rate}")
    if ucg_rate > 0 and not callable(getattr(module, "unconditional_input", None)):
        raise ValueError(f"{type(module).__name__} has ucg_rate {ucg_rate} but no "
                         "unconditional_input(batch_size) to drop to")
    module.input_key, module.kind = str(input_key), kind
    module.ucg_rate, module.is_trainable = float(ucg_rate), bool(is_trainable)
    module.legacy_til_exemption = bool(legacy_til_exemption)
    module.encode_method = method
    return set_trainable(module, is_trainable)


def set_trainable(module: nn.Module, trainable: bool) -> nn.Module:
    """Unfreeze ``module`` (a text tower's own ``unfreeze`` where it has one), or freeze it in
    eval mode."""
    if trainable:
        if callable(getattr(module, "unfreeze", None)):
            module.unfreeze()  # a text tower frozen by default
    else:
        module.eval()
        for p in module.parameters():
            p.requires_grad = False
    return module


def unconditional_value(embedder: nn.Module, batch_size: int) -> Any:
    """The embedder's unconditional input; a one-field batch dict counts as its field."""
    fn = getattr(embedder, "unconditional_input", None)
    if not callable(fn):
        raise AttributeError(f"{type(embedder).__name__} has no unconditional_input(batch_size) "
                             "for classifier-free guidance")
    value = fn(batch_size)
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ValueError(f"{type(embedder).__name__}.unconditional_input gave several fields "
                             f"{sorted(value)}; give one value")
        value = next(iter(value.values()))
    return value


def replace_where(value: Any, other: Any, mask: torch.Tensor) -> Any:
    """``value`` with its samples where ``mask`` is True taken from ``other`` (lists, tensors)."""
    if torch.is_tensor(value):
        other = torch.as_tensor(other, device=value.device, dtype=value.dtype)
        m = mask.to(value.device).view(-1, *([1] * (value.dim() - 1)))
        return torch.where(m, other, value)
    return [o if bool(d) else v for v, o, d in zip(value, other, mask.tolist())]


def _batch_size(value: Any) -> int:
    return int(value.shape[0]) if torch.is_tensor(value) else len(value)


def _encode(embedder: nn.Module, value: Any) -> torch.Tensor:
    """The embedder's output: its ``encode_method``, else ``encode`` where it has one, else its
    forward (CompVis' cond stage)."""
    if embedder.encode_method is not None:
        fn = getattr(embedder, embedder.encode_method)
    else:
        fn = embedder.encode if callable(getattr(embedder, "encode", None)) else embedder
    out = fn(value)
    if not torch.is_tensor(out) and callable(getattr(out, "mode", None)):
        out = out.mode()  # a DiagonalGaussianDistribution
    return out


class ConditionerMixin:
    """What a conditioner does with its ``embedders`` (a name-to-embedder mapping): dropout,
    encoding, unconditional inputs, combining the outputs by kind."""

    embedders: Mapping[str, nn.Module]
    vector_combine: str = "sum"

    def __iter__(self):
        """The embedders, in config order."""
        return iter(self.embedders.values())

    @property
    def input_keys(self) -> list[str]:
        """The batch fields the embedders read."""
        return [e.input_key for e in self]

    @property
    def is_trainable(self) -> bool:
        """Whether any embedder trains."""
        return any(e.is_trainable for e in self)

    def _value(self, embedder: nn.Module, batch: Mapping[str, Any]) -> Any:
        if embedder.input_key not in batch:
            raise KeyError(f"batch has no field {embedder.input_key!r} for "
                           f"{type(embedder).__name__} (fields: {sorted(batch)})")
        return batch[embedder.input_key]

    def drop_mask(self, embedder: nn.Module, value: Any) -> torch.Tensor:
        """Per-sample guidance-dropout decisions (one ``torch.rand`` draw per sample)."""
        u = torch.rand(_batch_size(value))
        exempt = None
        if embedder.legacy_til_exemption:
            exempt = [(levels_from_caption(str(c)) or ("", ""))[1] == "high" for c in value]
        return torch.as_tensor(drop_decisions(u.numpy(), embedder.ucg_rate, exempt))

    def embed(self, embedder: nn.Module, batch: Mapping[str, Any], ucg: bool = False,
              uncond: bool = False) -> torch.Tensor:
        """One embedder's output for ``batch`` (``ucg``: with its dropout; ``uncond``: all
        samples unconditional)."""
        value = self._value(embedder, batch)
        if uncond:
            value = unconditional_value(embedder, _batch_size(value))
        elif ucg and embedder.ucg_rate > 0:
            mask = self.drop_mask(embedder, value)
            if mask.any():
                value = replace_where(value, unconditional_value(embedder, len(mask)), mask)
        with torch.set_grad_enabled(embedder.is_trainable and torch.is_grad_enabled()):
            return _encode(embedder, value)

    def forward(self, batch: Mapping[str, Any], ucg: bool = False,
                uncond_keys: Collection[str] = ()) -> Any:
        """``{"c_crossattn": [tokens], "y": vector, "c_concat": [channels]}`` (kinds present;
        a :class:`SingleEmbedderView` gives its embedder's output as it is).

        ``ucg``: apply each embedder's guidance dropout (training); ``uncond_keys``: input keys
        whose embedders give their unconditional output (partial guidance).
        """
        unknown = set(uncond_keys) - set(self.input_keys)
        if unknown:
            raise KeyError(f"no embedder reads {sorted(unknown)} (input keys {self.input_keys})")
        outs: dict[str, list[torch.Tensor]] = {}
        for e in self:
            out = self.embed(e, batch, ucg=ucg, uncond=e.input_key in uncond_keys)
            outs.setdefault(e.kind, []).append(out)
        return self._combine(outs)

    def _combine(self, outs: Mapping[str, list[torch.Tensor]]) -> dict[str, Any]:
        cond: dict[str, Any] = {}
        if "crossattn" in outs:
            cond["c_crossattn"] = [torch.cat(outs["crossattn"], dim=1)]
        if "concat" in outs:
            cond["c_concat"] = [torch.cat(outs["concat"], dim=1)]
        if "vector" in outs:
            vectors = [v.reshape(v.shape[0], -1) for v in outs["vector"]]
            if self.vector_combine == "concat":
                cond["y"] = torch.cat(vectors, dim=-1)
            else:
                widths = {v.shape[-1] for v in vectors}
                if len(widths) > 1:
                    raise ValueError(f"vector embedders of widths {sorted(widths)} cannot be "
                                     "summed; set vector_combine: concat")
                cond["y"] = torch.stack(vectors).sum(0)
        return cond

    def unconditional(self, batch_size: int) -> Any:
        """The fully unconditional output for ``batch_size`` samples."""
        batch = {e.input_key: unconditional_value(e, batch_size) for e in self}
        return self(batch)


class Conditioner(ConditionerMixin, nn.Module):
    """Embedders combined into the DiffusionWrapper's ``c_crossattn`` / ``y`` / ``c_concat``.

    Args:
        embedders: ``{target, params, input_key, kind, ucg_rate, is_trainable,
            legacy_til_exemption, method}`` per embedder (module docstring).
            ``legacy_til_exemption`` (text embedders reading training captions): never drop a
            caption whose TIL level is high, as the original PathLDM dataset did.
        vector_combine: ``sum`` (vectors of equal width) or ``concat`` (along the features).
    """

    def __init__(self, embedders: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
                 vector_combine: str = "sum") -> None:
        super().__init__()
        if not embedders:
            raise ValueError("Conditioner needs at least one embedder")
        if vector_combine not in VECTOR_COMBINES:
            raise ValueError(f"vector_combine must be one of {VECTOR_COMBINES}, "
                             f"got {vector_combine!r}")
        self.vector_combine = vector_combine
        named = (embedders.items() if isinstance(embedders, Mapping)
                 else ((str(i), cfg) for i, cfg in enumerate(embedders)))
        modules = {}
        for name, cfg in named:
            if "input_key" not in cfg:
                raise KeyError(f"Conditioner embedder {name} ({cfg.get('target')}) has no "
                               "input_key")
            spec = {k: cfg[k] for k in SPEC_KEYS if k in cfg}
            module = instantiate_from_config({k: v for k, v in cfg.items() if k not in spec})
            modules[str(name)] = configure_embedder(module, **spec)
        self.embedders = nn.ModuleDict(modules)

    def train(self, mode: bool = True) -> Conditioner:
        """Frozen embedders stay in eval mode."""
        super().train(mode)
        for e in self:
            if not e.is_trainable:
                e.eval()
        return self


class SingleEmbedderView(ConditionerMixin):
    """One embedder seen as a one-entry :class:`Conditioner` (no guidance dropout: the data's
    ``p_uncond`` does it), for a model whose ``cond_stage_config`` is that embedder.

    Not a module: the model registers the embedder itself, so its state-dict keys, strict
    loading, EMA and optimizer groups are those of a plain ``cond_stage_model``. Its output is
    the embedder's own, not a dict: CompVis' form, which ``LatentDiffusion.apply_model`` routes
    by ``conditioning_key`` (and ``get_learned_conditioning`` returns).
    """

    def __init__(self, embedder: nn.Module, input_key: str, kind: str = "crossattn",
                 is_trainable: bool = False, method: str | None = None) -> None:
        self.embedders = {"0": configure_embedder(embedder, input_key, kind,
                                                  is_trainable=is_trainable, method=method)}

    def __call__(self, batch: Mapping[str, Any], ucg: bool = False,
                 uncond_keys: Collection[str] = ()) -> Any:
        """The embedder's output for ``batch`` (see :meth:`ConditionerMixin.forward`)."""
        return self.forward(batch, ucg=ucg, uncond_keys=uncond_keys)

    def _combine(self, outs: Mapping[str, list[torch.Tensor]]) -> Any:
        ((out,),) = outs.values()
        return out
