"""Explicit two-way key mapping between this project's checkpoints and diffusers components.

A LatentDiffusion ``state_dict`` is split into components (U-Net, first stage, text tower,
class embedder) and every key is renamed by two kinds of table, both written out below:

* a *module* table, built from the architecture config, that maps each CompVis block
  (``input_blocks.4.0``) to its diffusers block (``down_blocks.1.resnets.0``) together with the
  *leaf* table of that block's type;
* *leaf* tables (:data:`UNET_RESBLOCK`, :data:`VAE_RESBLOCK`, :data:`VAE_ATTENTION`,
  :func:`transformer_leaves`) that rename the parameters inside a block.

:func:`build_map` applies them to a concrete list of keys and fails on any key without a rule
or any two keys with the same target; :func:`convert` renames a state dict in either direction
and checks that nothing is left over and nothing is missing. No diffusers import here: an
exported folder loads back into this project without diffusers installed.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
CLASS_PREFIX = "cond_stage_model."
# Buffers of the diffusion schedule: recomputed from linear_start/linear_end/timesteps, which the
# scheduler config carries; the export checks that they equal the config's schedule.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
EMA_PREFIX = "model_ema."  # EMA shadows: exported in place of the weights, or left out
SCALE_FACTOR_KEY = "scale_factor"  # a buffer with scale_by_std; vae.config.scaling_factor

# CompVis openaimodel.ResBlock -> diffusers ResnetBlock2D
UNET_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2",
                 "skip_connection": "conv_shortcut"}
# CompVis autoencoder ResnetBlock -> diffusers ResnetBlock2D (no timestep input)
VAE_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                "nin_shortcut": "conv_shortcut"}
# CompVis AttnBlock (1x1 convs) -> diffusers Attention (linears): weights change shape
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                 "proj_out": "to_out.0"}
VAE_ATTENTION_RESHAPED = ("q", "k", "v", "proj_out")
# top-level single modules
UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in",
            "out.0": "conv_norm_out", "out.2": "conv_out"}
VAE_TOP = {"encoder.conv_in": "encoder.conv_in", "encoder.norm_out": "encoder.conv_norm_out",
           "encoder.conv_out": "encoder.conv_out", "decoder.conv_in": "decoder.conv_in",
           "decoder.norm_out": "decoder.conv_norm_out", "decoder.conv_out": "decoder.conv_out",
           "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv",
           "quantize.embedding": "quantize.embedding"}
CONV_LEAF = {"": ""}  # a block that is one layer: weight and bias keep their names


def transformer_leaves(depth: int) -> dict[str, str]:
    """CompVis SpatialTransformer -> diffusers Transformer2DModel (conv proj_in/proj_out)."""
    leaves = {"norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out"}
    for d in range(depth):
        for part in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                     "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
            leaves[f"transformer_blocks.{d}.{part}"] = f"transformer_blocks.{d}.{part}"
    return leaves


@dataclass
class ModuleTable:
    """Block prefix (source) -> (target prefix, leaf table); keys ``prefix.leaf.param``."""

    blocks: dict[str, tuple[str, Mapping[str, str]]] = field(default_factory=dict)
    reshaped: set[str] = field(default_factory=set)  # source module paths stored as 1x1 convs

    def add(self, source: str, target: str, leaves: Mapping[str, str]) -> None:
        """Register one block; a source prefix may appear once."""
        if source in self.blocks:
            raise ValueError(f"block {source!r} mapped twice")
        self.blocks[source] = (target, leaves)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _levels(attention_resolutions: Iterable[int], n_levels: int) -> list[bool]:
    """Whether each U-Net level (downsampling factor 2**level) has attention."""
    res = set(attention_resolutions)
    return [2 ** level in res for level in range(n_levels)]


def unet_table(params: Mapping[str, Any]) -> ModuleTable:
    """The U-Net's blocks, from its ``unet_config.params`` (CompVis constructor arguments)."""
    mult = list(params.get("channel_mult", (1, 2, 4, 8)))
    n_res = int(params["num_res_blocks"])
    attn = _levels(params["attention_resolutions"], len(mult))
    trans = transformer_leaves(int(params.get("transformer_depth", 1)))
    t = ModuleTable()
    for src, dst in UNET_TOP.items():
        t.add(src, dst, CONV_LEAF)
    k = 1
    for level in range(len(mult)):
        for j in range(n_res):
            t.add(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESBLOCK)
            if attn[level]:
                t.add(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", trans)
            k += 1
        if level != len(mult) - 1:
            t.add(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv",
                  CONV_LEAF)
            k += 1
    t.add("middle_block.0", "mid_block.resnets.0", UNET_RESBLOCK)
    t.add("middle_block.1", "mid_block.attentions.0", trans)
    t.add("middle_block.2", "mid_block.resnets.1", UNET_RESBLOCK)
    k = 0
    for up, level in enumerate(reversed(range(len(mult)))):
        for j in range(n_res + 1):
            t.add(f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}", UNET_RESBLOCK)
            if attn[level]:
                t.add(f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{j}", trans)
            if level and j == n_res:
                t.add(f"output_blocks.{k}.{2 if attn[level] else 1}.conv",
                      f"up_blocks.{up}.upsamplers.0.conv", CONV_LEAF)
            k += 1
    return t


def _vae_mid(t: ModuleTable, side: str) -> None:
    t.add(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESBLOCK)
    t.add(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION)
    t.reshaped.update(f"{side}.mid.attn_1.{name}" for name in VAE_ATTENTION_RESHAPED)
    t.add(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESBLOCK)


def vae_table(ddconfig: Mapping[str, Any]) -> ModuleTable:
    """The first stage's blocks (VQ or KL), from its ``ddconfig``."""
    if list(ddconfig.get("attn_resolutions", [])):
        raise ValueError("first stage with attn_resolutions "
                         f"{list(ddconfig['attn_resolutions'])}: diffusers' encoder/decoder "
                         "blocks have no attention outside the middle block; not exportable")
    n = len(ddconfig["ch_mult"])
    n_res = int(ddconfig["num_res_blocks"])
    t = ModuleTable()
    for src, dst in VAE_TOP.items():
        t.add(src, dst, CONV_LEAF)
    for level in range(n):
        for j in range(n_res):
            t.add(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}",
                  VAE_RESBLOCK)
        if level != n - 1:
            t.add(f"encoder.down.{level}.downsample.conv",
                  f"encoder.down_blocks.{level}.downsamplers.0.conv", CONV_LEAF)
    _vae_mid(t, "encoder")
    _vae_mid(t, "decoder")
    for level in range(n):
        up = n - 1 - level  # CompVis indexes decoder levels by resolution, diffusers by order
        for j in range(n_res + 1):
            t.add(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}",
                  VAE_RESBLOCK)
        if level != 0:
            t.add(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv",
                  CONV_LEAF)
    return t


def _rename(key: str, table: ModuleTable) -> tuple[str, bool]:
    """Target name of ``key`` and whether its tensor changes shape; KeyError without a rule."""
    module, _, param = key.rpartition(".")
    for cut in range(module.count(".") + 1, -1, -1):
        block = ".".join(module.split(".")[:cut]) if cut else ""
        if block not in table.blocks:
            continue
        target, leaves = table.blocks[block]
        leaf = module[len(block) + 1:] if block != module else ""
        if leaf in leaves:
            return (_join(target, leaves[leaf], param),
                    module in table.reshaped and param == "weight")
    raise KeyError(key)


@dataclass
class KeyMap:
    """A complete one-to-one renaming of a component's keys (``source -> target``)."""

    names: dict[str, str]
    reshaped: set[str]  # source keys whose tensor is a 1x1 conv on the source side

    def inverse_names(self) -> dict[str, str]:
        """``target -> source``."""
        return {v: k for k, v in self.names.items()}


def build_map(keys: Iterable[str], table: ModuleTable, prefix: str = "") -> KeyMap:
    """Map every key (``prefix`` + name) through ``table``; refuses gaps and collisions."""
    names, reshaped, unmapped = {}, set(), []
    for key in keys:
        try:
            target, reshape = _rename(key[len(prefix):], table)
        except KeyError:
            unmapped.append(key)
            continue
        names[key] = target
        if reshape:
            reshaped.add(key)
    if unmapped:
        raise KeyError(f"{len(unmapped)} keys have no diffusers name (first: {unmapped[:5]})")
    clash = len(set(names.values())) != len(names)
    if clash:
        seen: dict[str, str] = {}
        dup = [(seen.setdefault(v, k), k) for k, v in names.items() if seen.get(v, k) != k]
        raise KeyError(f"keys mapped to the same diffusers name: {dup[:3]}")
    return KeyMap(names, reshaped)


def prefix_map(keys: Iterable[str], source_prefix: str, target_prefix: str) -> KeyMap:
    """Same names under another prefix (the text tower, the class embedding)."""
    keys = list(keys)
    bad = [k for k in keys if not k.startswith(source_prefix)]
    if bad:
        raise KeyError(f"keys outside {source_prefix!r}: {bad[:5]}")
    return KeyMap({k: target_prefix + k[len(source_prefix):] for k in keys}, set())


def convert(state_dict: Mapping[str, torch.Tensor], keymap: KeyMap,
            expected: Iterable[str] | None = None, inverse: bool = False,
            what: str = "component") -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` by ``keymap`` (``inverse``: target -> source names).

    Every input key must be mapped (nothing left over) and, with ``expected``, the output keys
    must be exactly ``expected`` (nothing missing, nothing extra).
    """
    names = keymap.inverse_names() if inverse else keymap.names
    reshaped = ({keymap.names[k] for k in keymap.reshaped} if inverse else keymap.reshaped)
    extra = sorted(set(state_dict) - set(names))
    missing_in = sorted(set(names) - set(state_dict))
    if extra or missing_in:
        raise KeyError(f"{what}: {len(extra)} keys without a mapping (first: {extra[:5]}), "
                       f"{len(missing_in)} mapped keys absent (first: {missing_in[:5]})")
    out = {}
    for key, value in state_dict.items():
        if key in reshaped:
            value = value[:, :, None, None] if inverse else value.reshape(value.shape[:2])
        out[names[key]] = value
    if expected is not None:
        expected = set(expected)
        missing = sorted(expected - set(out))
        over = sorted(set(out) - expected)
        if missing or over:
            raise KeyError(f"{what}: converted keys differ from the target's: missing "
                           f"{missing[:5]} ({len(missing)}), unexpected {over[:5]} ({len(over)})")
    return out


def split_components(keys: Sequence[str], has_text: bool) -> dict[str, list[str]]:
    """Group LatentDiffusion keys by exported component; fail on keys no component owns."""
    groups: dict[str, list[str]] = {"unet": [], "vae": [], "text_encoder": [],
                                    "class_embedder": [], "scheduler": [], "ema": []}
    other = []
    for k in keys:
        if k.startswith(UNET_PREFIX):
            groups["unet"].append(k)
        elif k.startswith(VAE_PREFIX):
            groups["vae"].append(k)
        elif has_text and k.startswith(TEXT_PREFIX):
            groups["text_encoder"].append(k)
        elif not has_text and k.startswith(CLASS_PREFIX):
            groups["class_embedder"].append(k)
        elif k in SCHEDULE_BUFFERS or k == SCALE_FACTOR_KEY:
            groups["scheduler"].append(k)
        elif k.startswith(EMA_PREFIX):
            groups["ema"].append(k)
        else:
            other.append(k)
    if other:
        raise KeyError(f"{len(other)} checkpoint keys belong to no exported component "
                       f"(first: {other[:5]})")
    return groups
