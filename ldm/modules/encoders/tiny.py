"""Tiny offline CLIP text towers for tests and demos (real CLIP BPE vocabulary, random weights)."""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# CLIP keeps the first 49152 - 256 - 2 merges of the 16e6 BPE file (after its header line).
_NUM_MERGES = 49152 - 256 - 2


def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The OpenAI CLIP vocabulary (49408 ids) and merge list, formed from open_clip's BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:_NUM_MERGES + 1]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{default_bpe()}: expected {CLIP_VOCAB_SIZE} CLIP tokens, "
                           f"got {len(vocab)}")
    return vocab, merges


def write_clip_tokenizer_files(out_dir: str | Path,
                               model_max_length: int = CLIP_CONTEXT_LENGTH) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of the CLIP tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab_and_merges()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                        encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "do_lower_case": True,
        "errors": "replace",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
               "unk_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2),
                                                     encoding="utf-8")
    return out_dir


def tiny_clip_text_config(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                          intermediate_size: int = 64, **overrides):
    """A ``CLIPTextConfig`` with CLIP's vocabulary, 77 positions and quick_gelu."""
    from transformers import CLIPTextConfig

    params = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, max_position_embeddings=CLIP_CONTEXT_LENGTH,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                  dropout=0.0, projection_dim=hidden_size, bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=49407)
    params.update(overrides)
    return CLIPTextConfig(**params)


def build_tiny_clip_text_encoder(out_dir: str | Path, hidden_size: int = 32, num_layers: int = 2,
                                 num_heads: int = 2, intermediate_size: int = 64,
                                 seed: int = 0) -> Path:
    """Write a transformers-loadable CLIP text tower (tokenizer + random ``CLIPTextModel``).

    The directory works as ``FrozenCLIPEmbedder(version=out_dir)`` offline; its token ids equal
    open_clip's and OpenAI CLIP's. The global RNG state is left untouched.
    """
    from transformers import CLIPTextModel

    out_dir = write_clip_tokenizer_files(out_dir)
    config = tiny_clip_text_config(hidden_size, num_layers, num_heads, intermediate_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    model.save_pretrained(out_dir)
    logger.info("wrote a tiny CLIP text tower (hidden %d, %d layers) to %s", hidden_size,
                num_layers, out_dir)
    return out_dir
