"""``FrozenOpenCLIPEmbedder``: the 154-token text encoder on open_clip (OpenAI CLIP ViT-B-32).

Same contract and numerics as the transformers backend (:mod:`ldm.modules.encoders.clip_text`):
the tower's ``state_dict`` uses the transformers names (``transformer.text_model.*``), and
checkpoints in either naming load, so PathLDM checkpoints and ours work with either library.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.modules.encoders.long_prompt import (
    FrozenLongPromptEncoder,
    causal_padding_bias,
    round_up_to_chunks,
)

logger = logging.getLogger(__name__)

_HF_PREFIX = "text_model."
# open_clip resblock names -> transformers CLIPEncoderLayer names (in_proj is split separately)
_BLOCK_NAMES = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TOP_NAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
}
_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ_RE = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_HF_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def open_clip_text_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip text tower's weights to transformers ``CLIPTextTransformer`` names.

    Input keys are relative to the tower (``token_embedding.weight``, ``transformer.resblocks.*``,
    ``ln_final.*``); output keys are relative to the text transformer (``embeddings.*``,
    ``encoder.layers.*``, ``final_layer_norm.*``). The fused ``in_proj`` is split into q, k, v.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
        elif m := _IN_PROJ_RE.fullmatch(key):
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
        elif (m := _BLOCK_RE.fullmatch(key)) and m[2] in _BLOCK_NAMES:
            out[f"encoder.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"open_clip text weight {key!r} has no transformers CLIP equivalent")
    return out


def hf_text_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`open_clip_text_to_hf` (``embeddings.position_ids`` is dropped)."""
    top = {v: k for k, v in _TOP_NAMES.items()}
    block = {v: k for k, v in _BLOCK_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == "embeddings.position_ids":
            continue
        if key in top:
            out[top[key]] = value
            continue
        m = _HF_LAYER_RE.fullmatch(key)
        if m and m[2] in block:
            out[f"transformer.resblocks.{m[1]}.{block[m[2]]}.{m[3]}"] = value
        elif m and m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((m[1], m[3]), {})[m[2][10]] = value
        else:
            raise KeyError(f"transformers CLIP text weight {key!r} has no open_clip equivalent")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {layer}: incomplete q/k/v {kind} ({sorted(parts)})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out


class OpenCLIPTextTower(nn.Module):
    """The text half of an open_clip CLIP model, run on chunked long prompts."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        text = getattr(clip_model, "text", clip_model)  # CustomTextCLIP keeps it in .text
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.heads = self.transformer.resblocks[0].attn.num_heads
        self.chunk_length = self.positional_embedding.shape[0]
        self.register_state_dict_post_hook(_rename_to_hf)
        self.register_load_state_dict_pre_hook(_rename_from_hf)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings per chunk (positions restart), concatenated."""
        return torch.cat([self.token_embedding(c) + self.positional_embedding[:c.shape[1]]
                          for c in input_ids.split(self.chunk_length, dim=-1)], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state after ``ln_final``, ``(B, L, D)``."""
        x = self.embed(input_ids)
        batch, length = input_ids.shape
        bias = causal_padding_bias(attention_mask, x.dtype)
        bias = bias.expand(-1, self.heads, -1, -1).reshape(batch * self.heads, length, length)
        if hasattr(self.transformer, "batch_first"):  # open_clip >= 2.24 takes (B, L, D)
            x = self.transformer(x, attn_mask=bias)
        else:  # older open_clip: (L, B, D)
            x = self.transformer(x.transpose(0, 1), attn_mask=bias).transpose(0, 1)
        return self.ln_final(x)


def _rename_to_hf(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: expose the tower under transformers names (``text_model.*``)."""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    mapped = {prefix + _HF_PREFIX + k: v for k, v in open_clip_text_to_hf(own).items()}
    items = list(state_dict.items())
    state_dict.clear()
    inserted = False
    for key, value in items:  # keep the tower's keys where they were
        if not key.startswith(prefix):
            state_dict[key] = value
        elif not inserted:
            state_dict.update(mapped)
            inserted = True


def _rename_from_hf(module, state_dict, prefix, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    """load pre-hook: accept transformers-named (PathLDM) weights as well as open_clip names."""
    hf_keys = [k for k in state_dict if k.startswith(prefix + _HF_PREFIX)]
    if not hf_keys:
        return
    start = len(prefix + _HF_PREFIX)
    converted = hf_text_to_open_clip({k[start:]: state_dict.pop(k) for k in hf_keys})
    state_dict.update({prefix + k: v for k, v in converted.items()})


def _resolve_pretrained(version: str | None) -> str | None:
    if version is None:
        return None
    path = Path(version).expanduser()
    if path.is_file():
        return str(path)
    if any(sep in str(version) for sep in ("/", "\\")) or path.suffix in (".pt", ".bin", ".pth",
                                                                            ".safetensors"):
        raise FileNotFoundError(f"open_clip checkpoint not found: {path}")
    return str(version)


class FrozenOpenCLIPEmbedder(FrozenLongPromptEncoder):
    """The 154-token text encoder on open_clip: ``arch`` with weights ``version``.

    ``version`` is an open_clip pretrained tag (``"openai"``), a local checkpoint file, or None
    for random weights. ``open_clip_kwargs`` go to ``open_clip.create_model`` (e.g. ``text_cfg``).
    """

    def __init__(self, arch: str = "ViT-B-32", version: str | None = "openai",
                 device: str | None = None, max_length: int = 154, cache_size: int = 4096,
                 cache_max_bytes: int | None = 1 << 30, quick_gelu: bool = True,
                 cache_dir: str | None = None,
                 open_clip_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__(cache_size=cache_size, cache_max_bytes=cache_max_bytes)
        import open_clip

        pretrained = _resolve_pretrained(version)
        try:
            model = open_clip.create_model(arch, pretrained=pretrained,
                                           force_quick_gelu=quick_gelu, cache_dir=cache_dir,
                                           **dict(open_clip_kwargs or {}))
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise OSError(
                f"open_clip could not build {arch!r} with weights {version!r}: "
                f"{type(err).__name__}: {err}. Offline, pass a local checkpoint file as "
                f"`version` (e.g. open_clip_pytorch_model.bin of the hub repo "
                f"timm/vit_base_patch32_clip_224.openai, downloaded on a networked machine)"
            ) from err
        self.tokenizer = open_clip.get_tokenizer(arch)
        if not all(hasattr(self.tokenizer, a) for a in ("encode", "sot_token_id", "eot_token_id")):
            raise ValueError(f"{arch}: needs open_clip's CLIP BPE tokenizer, got "
                             f"{type(self.tokenizer).__name__}")
        self.transformer = OpenCLIPTextTower(model)
        del model  # drop the vision tower
        self.version = f"{arch}:{version}"
        self.clip_max_length = self.transformer.chunk_length
        self.max_length = round_up_to_chunks(max_length, self.clip_max_length)
        self.bos_id = int(self.tokenizer.sot_token_id)
        self.eos_id = self.pad_id = int(self.tokenizer.eot_token_id)  # PLIP/CLIP pad with EOS
        self.freeze()

    def text_token_ids(self, texts: list[str]) -> list[list[int]]:
        """CLIP BPE ids without SOT/EOT."""
        return [self.tokenizer.encode(text) for text in texts]
