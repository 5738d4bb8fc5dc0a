"""The conditional diffusion U-Net (CompVis/OpenAI ``openaimodel``), state_dict-compatible.

Key names, module registration order and numerics follow CompVis latent-diffusion, so its
checkpoints load unchanged. Attention uses ``scaled_dot_product_attention``; gradient
checkpointing uses PyTorch's non-reentrant implementation (correct under autocast).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)
from ldm.util import load_checkpoint_into, read_state_dict

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands ``emb`` to timestep blocks and ``context`` to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two dims for 3D), optionally followed by a conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2,
                 out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv (padding 1) or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2,
                 out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride,
                              padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("pooling Downsample cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding; may resample or change width."""

    def __init__(self, channels: int, emb_channels: int, dropout: float,
                 out_channels: int | None = None, use_conv: bool = False,
                 use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = self.h_upd(in_rest(x))
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over ``(B, H, T, C)`` heads; returns channel-first ``(B, H*C, T)``.

    Softmax of ``(q·k)/sqrt(C)`` over keys. The OpenAI blocks scale q and k each by ``C^-1/4``
    (the same product, split for fp16 range); SDPA applies the scale in fp32 accumulation.
    """
    b, h, t, c = q.shape
    out = F.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)
    return out.transpose(-1, -2).reshape(b, h * c, t)


def _head_channels(width: int, n_heads: int) -> int:
    """Channels per head of a fused ``(B, 3*H*C, T)`` qkv tensor."""
    if width % (3 * n_heads):
        raise ValueError(f"qkv width {width} not divisible by 3*{n_heads} heads")
    return width // (3 * n_heads)


class QKVAttentionLegacy(nn.Module):
    """QKV attention with heads split *before* q/k/v: input ``(B, H*3*C, T)``."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = _head_channels(width, self.n_heads)
        # One transposed copy gives fused kernels unit-stride head dims.
        qkv = qkv.reshape(bs, self.n_heads, 3 * ch, length).transpose(-1, -2).contiguous()
        return _attend(*qkv.split(ch, dim=-1))


class QKVAttention(nn.Module):
    """QKV attention with q/k/v split *before* heads: input ``(B, 3*H*C, T)``."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = _head_channels(width, self.n_heads)
        qkv = qkv.reshape(bs, 3, self.n_heads, ch, length).transpose(-1, -2).contiguous()
        return _attend(*qkv.unbind(1))


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions (N-d), with a zero-initialised output conv."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels "
                                 f"{num_head_channels}")
            self.num_heads = channels // num_head_channels
        # CompVis always checkpoints this block, whatever use_checkpoint says.
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention(self.num_heads) if use_new_attention_order
                          else QKVAttentionLegacy(self.num_heads))
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), True)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


def _heads(ch: int, num_heads: int, num_head_channels: int, legacy: bool,
           use_spatial_transformer: bool) -> tuple[int, int]:
    """(num_heads, dim_head) for an attention layer of width ``ch``, exactly as CompVis."""
    if num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = ch // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


def _check_attention_args(use_spatial_transformer: bool, context_dim: int | None,
                          num_heads: int, num_head_channels: int) -> None:
    """Refuse attention settings the U-Net cannot build, naming them."""
    if use_spatial_transformer and context_dim is None:
        raise ValueError("use_spatial_transformer=True needs context_dim (the width of the "
                         "cross-attention conditioning)")
    if context_dim is not None and not use_spatial_transformer:
        raise ValueError("context_dim is set but use_spatial_transformer=False; "
                         "cross-attention conditioning needs the spatial transformer")
    if num_heads == -1 and num_head_channels == -1:
        raise ValueError("either num_heads or num_head_channels has to be set")


class UNetModel(nn.Module):
    """The full U-Net with timestep embedding, attention and optional conditioning.

    Constructor parameters are those of CompVis latent-diffusion (``num_heads`` /
    ``num_head_channels`` pick the attention heads, ``use_spatial_transformer`` switches to
    cross-attention on ``context``, ``num_classes`` adds a label embedding for ``y``: class
    ids, or with ``"sequential"`` a vector of width ``adm_in_channels`` through two linear
    layers, as sgm).
    ``ckpt_path`` loads a CompVis checkpoint (a full LDM with ``model.diffusion_model.`` keys or
    bare U-Net keys); unlike the original, missing or unexpected keys raise unless
    ``strict_load=False``. Keys starting with any of ``ignore_keys`` are dropped first.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        ckpt_path: str | Path | None = None,
        ignore_keys: Iterable[str] = (),
        strict_load: bool = True,
        adm_in_channels: int | None = None,
    ) -> None:
        super().__init__()
        _check_attention_args(use_spatial_transformer, context_dim, num_heads, num_head_channels)
        self.image_size, self.in_channels = image_size, in_channels
        self.model_channels, self.out_channels = model_channels, out_channels
        self.num_res_blocks, self.conv_resample = num_res_blocks, conv_resample
        self.attention_resolutions = list(attention_resolutions)
        self.dropout, self.channel_mult = dropout, list(channel_mult)
        self.num_classes, self.adm_in_channels = num_classes, adm_in_channels
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.predict_codebook_ids = n_embed is not None
        self._legacy = legacy
        self._use_spatial_transformer = use_spatial_transformer
        self._transformer_depth, self._context_dim = transformer_depth, context_dim
        self._use_new_attention_order = use_new_attention_order

        # submodules in CompVis' registration order (state-dict keys and their order)
        block = dict(emb_channels=model_channels * 4, dropout=dropout, dims=dims,
                     use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)
        self._build_embeddings(block["emb_channels"])
        chans, ds = self._build_input_blocks(block, dims, resblock_updown)
        self._build_middle_block(block, chans[-1])
        ch = self._build_output_blocks(block, chans, ds, self.num_heads_upsample, resblock_updown)
        self._build_out(ch, dims, n_embed)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, strict=strict_load)

    def _build_embeddings(self, time_embed_dim: int) -> None:
        """Create ``time_embed`` and, for a class-conditional model, ``label_emb``."""
        self.time_embed = nn.Sequential(
            linear(self.model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if self.num_classes == "sequential":  # a conditioner's vector y (B, adm_in_channels)
            if not self.adm_in_channels:
                raise ValueError("num_classes 'sequential' needs adm_in_channels (the width of y)")
            self.label_emb = nn.Sequential(nn.Sequential(
                linear(self.adm_in_channels, time_embed_dim), nn.SiLU(),
                linear(time_embed_dim, time_embed_dim)))
        elif self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, time_embed_dim)

    def _build_middle_block(self, block: dict, ch: int) -> None:
        """Create ``middle_block``: ResBlock, attention, ResBlock at width ``ch``."""
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, **block),
            self._attention(ch, self.num_heads, self.num_head_channels, self.num_heads),
            ResBlock(ch, **block),
        )
        self._feature_size += ch

    def _build_out(self, ch: int, dims: int, n_embed: int | None) -> None:
        """Create the output head ``out`` (and ``id_predictor`` when predicting codebook ids)."""
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, self.model_channels, self.out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(
                normalization(ch),
                conv_nd(dims, self.model_channels, n_embed, 1),
            )

    def _attention(self, ch: int, num_heads: int, num_head_channels: int,
                   block_heads: int) -> nn.Module:
        """The attention layer at width ``ch`` (``block_heads`` for an AttentionBlock)."""
        heads, dim_head = _heads(ch, num_heads, num_head_channels, self._legacy,
                                 self._use_spatial_transformer)
        if self._use_spatial_transformer:
            return SpatialTransformer(ch, heads, dim_head, depth=self._transformer_depth,
                                      context_dim=self._context_dim)
        return AttentionBlock(ch, use_checkpoint=self.use_checkpoint, num_heads=block_heads,
                              num_head_channels=dim_head,
                              use_new_attention_order=self._use_new_attention_order)

    def _build_input_blocks(self, block: dict, dims: int,
                            resblock_updown: bool) -> tuple[list[int], int]:
        """Create ``input_blocks``; return every block's output width and the final ds."""
        mc = self.model_channels
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, self.in_channels, mc, 3, padding=1))])
        self._feature_size = mc
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, out_channels=mult * mc, **block)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads, self.num_head_channels,
                                                  self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (ResBlock(ch, out_channels=ch, down=True, **block) if resblock_updown
                        else Downsample(ch, self.conv_resample, dims=dims, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
                self._feature_size += ch
        return chans, ds

    def _build_output_blocks(self, block: dict, chans: list[int], ds: int, heads_up: int,
                             resblock_updown: bool) -> int:
        """Create ``output_blocks`` (consuming ``chans``); return the final channel count."""
        mc, ch = self.model_channels, chans[-1]
        chans = list(chans)
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(ch + chans.pop(), out_channels=mc * mult, **block)]
                ch = mc * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads, self.num_head_channels,
                                                  heads_up))
                if level and i == self.num_res_blocks:
                    layers.append(
                        ResBlock(ch, out_channels=ch, up=True, **block) if resblock_updown
                        else Upsample(ch, self.conv_resample, dims=block["dims"], out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
        return ch

    def init_from_ckpt(self, path: str | Path, ignore_keys: Iterable[str] = (),
                       strict: bool = True) -> None:
        """Load U-Net weights from a CompVis checkpoint (prefixed full LDM or bare keys).

        ``ignore_keys`` match the checkpoint's own keys or the keys after the prefix is
        stripped. With ``strict`` any missing or unexpected key raises, naming the keys.
        """
        ignore_keys = tuple(ignore_keys)
        sd = read_state_dict(path)
        dropped = [k for k in sd if k.startswith(ignore_keys)] if ignore_keys else []
        if dropped:
            logger.info("UNetModel: ignoring %d keys of %s (first 10): %s",
                        len(dropped), path, dropped[:10])
            for k in dropped:
                del sd[k]
        load_checkpoint_into(self, sd, prefix=UNET_PREFIX, ignore_keys=ignore_keys,
                             allow_missing=not strict, allow_unexpected=not strict,
                             name=f"UNetModel (from {path})")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None,
                label_embedding: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Predict from ``x (N, C, ...)`` at ``timesteps (N,)``, with ``context``/``y``."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("must specify y if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if label_embedding is not None:
            emb = emb + label_embedding
        if self.num_classes is not None:
            want = ((x.shape[0], self.adm_in_channels) if self.num_classes == "sequential"
                    else (x.shape[0],))
            if tuple(y.shape) != want:
                raise ValueError(f"y must have shape {want}, got {tuple(y.shape)}")
            emb = emb + self.label_emb(y.to(emb.dtype) if y.is_floating_point() else y)

        hs = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        h = h.to(x.dtype)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
