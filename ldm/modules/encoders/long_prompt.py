"""PathLDM's long-prompt text conditioning, independent of the library serving the text tower.

A prompt is tokenized to ``max_length`` (154) ids: ``[BOS] + text + [EOS] + pad``. The ids are
split into chunks of the tower's context length (77), each chunk gets the tower's token and
position embedding (positions restart in every chunk), the chunks are concatenated and run
through the transformer with one causal mask over all positions combined with the padding mask,
and the last hidden state after the final layer norm is the conditioning ``(B, 154, D)``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from ldm.modules.encoders.cache import EmbeddingCache

logger = logging.getLogger(__name__)


def round_up_to_chunks(max_length: int, chunk_length: int) -> int:
    """``chunk_length * ceil(max_length / chunk_length)`` (PathLDM's token budget)."""
    if max_length < 2 or chunk_length < 2:
        raise ValueError(f"max_length and the text tower's context length must be >= 2, got "
                         f"{max_length} and {chunk_length}")
    return chunk_length * math.ceil(max_length / chunk_length)


def build_long_prompt_ids(token_lists: Sequence[Sequence[int]], max_length: int, bos_id: int,
                          eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack text token ids (no special tokens) as ``[BOS] + text[:max_length-2] + [EOS] + pad``.

    Returns int64 ``input_ids`` and ``attention_mask`` of shape ``(B, max_length)``; the mask is 1
    on BOS, text and EOS and 0 on padding (pad and EOS may share an id, so the mask is not
    derived from the ids).
    """
    keep = max_length - 2
    ids = torch.full((len(token_lists), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), max_length), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        seq = [bos_id, *list(tokens)[:keep], eos_id]
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


def causal_padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``(B, 1, L, L)``: 0 where query i may see key j, else finfo.min.

    Key j is visible to query i when ``j <= i`` and j is not padding. Padding positions are
    still queries (they see every earlier non-pad token), as in PathLDM.
    """
    batch, length = attention_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    bias = torch.zeros(batch, 1, length, length, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class FrozenLongPromptEncoder(nn.Module):
    """Frozen text encoder with PathLDM's long prompts, truncation warnings and an embedding cache.

    Frozen as in PathLDM; :meth:`unfreeze` makes it trainable (``cond_stage_trainable``).

    Subclasses set ``self.transformer`` (a module called as ``transformer(input_ids,
    attention_mask)`` returning ``(B, L, D)``), ``self.max_length`` and the special token ids, and
    implement :meth:`text_token_ids`.
    """

    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int
    transformer: nn.Module

    def __init__(self, cache_size: int = 4096, cache_max_bytes: int | None = 1 << 30) -> None:
        super().__init__()
        self.cache = EmbeddingCache(cache_size, cache_max_bytes)
        self._cache_signature: tuple | None = None
        self._warned_prompts: set[str] = set()
        self.register_load_state_dict_post_hook(_clear_cache_after_load)
        self.trainable = False

    # -- frozen module -------------------------------------------------------------------------
    def freeze(self) -> None:
        """Eval mode and no gradients for every parameter."""
        super().train(False)
        self.trainable = False
        for param in self.parameters():
            param.requires_grad_(False)

    def unfreeze(self) -> None:
        """Train the tower with the diffusion model (``cond_stage_trainable``).

        :meth:`encode` then builds a graph whenever gradients are enabled and bypasses the
        embedding cache (the weights change every step). Dropout stays off.
        """
        self.trainable = True
        self.clear_cache()
        for param in self.parameters():
            param.requires_grad_(True)

    def train(self, mode: bool = True) -> FrozenLongPromptEncoder:
        """Stay in eval mode, also when trainable (dropout off, as in PathLDM)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the text tower's weights."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the text tower's weights."""
        return next(self.transformer.parameters()).dtype

    # -- tokenization --------------------------------------------------------------------------
    def text_token_ids(self, texts: list[str]) -> list[list[int]]:
        """BPE ids of each text without special tokens (implemented by the backend)."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of shape ``(B, max_length)``; warns on truncation."""
        texts = _check_texts(texts)
        token_lists = self.text_token_ids(texts)
        for text, tokens in zip(texts, token_lists):
            self._warn_if_truncated(text, len(tokens))
        return build_long_prompt_ids(token_lists, self.max_length, self.bos_id, self.eos_id,
                                     self.pad_id)

    def _warn_if_truncated(self, text: str, n_tokens: int) -> None:
        dropped = n_tokens - (self.max_length - 2)
        if dropped <= 0 or text in self._warned_prompts:
            return
        self._warned_prompts.add(text)
        preview = text if len(text) <= 80 else text[:77] + "..."
        logger.warning("prompt of %d text tokens truncated to %d tokens (BOS and EOS included): "
                       "%d tokens dropped: %r", n_tokens, self.max_length, dropped, preview)

    # -- encoding ------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget every cached embedding (call after changing the weights in place)."""
        self.cache.clear()

    def _sync_cache(self) -> None:
        signature = (self.device, self.dtype, self.max_length)
        if signature != self._cache_signature:
            self.cache.clear()
            self._cache_signature = signature

    def encode(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Embed prompts as ``(B, max_length, D)``; only captions missing from the cache run.

        Frozen towers never build a graph; a trainable one (:meth:`unfreeze`) runs every caption
        and keeps the graph when gradients are enabled.
        """
        texts = _check_texts(texts)
        if self.trainable:
            return self._embed(*self.tokenize(texts))
        with torch.no_grad():
            return self._encode_cached(texts)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # outside autocast, in the tower's own precision (float32), as the original: only
        # the U-Net runs under mixed precision, so a caption embeds the same in a bf16-mixed
        # training step, in validation and in float32 sampling, and one cache serves all
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.transformer(input_ids.to(self.device), attention_mask.to(self.device))

    def _encode_cached(self, texts: list[str]) -> torch.Tensor:
        self._sync_cache()
        found: dict[str, torch.Tensor] = {}
        missing = []
        for text in dict.fromkeys(texts):  # unique, in order
            hit = self.cache.get((text, self.max_length))
            if hit is None:
                missing.append(text)
            else:
                found[text] = hit
        if missing:
            z = self._embed(*self.tokenize(missing))
            for text, row in zip(missing, z):
                found[text] = row
                self.cache.put((text, self.max_length), row)
        device = self.device
        return torch.stack([found[text].to(device) for text in texts])

    def forward(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(texts)

    def unconditional_input(self, batch_size: int) -> list[str]:
        """Raw input of the classifier-free-guidance branch: the empty prompt."""
        return [""] * batch_size


def _check_texts(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text conditioning expects a list of str; item {i} is "
                            f"{type(text).__name__}: {text!r}")
    return texts


def _clear_cache_after_load(module: FrozenLongPromptEncoder, incompatible_keys) -> None:
    module.clear_cache()
