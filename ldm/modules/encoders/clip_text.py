"""``FrozenCLIPEmbedder``: PathLDM's 154-token CLIP/PLIP text encoder on Hugging Face transformers.

Only public transformers APIs are used: the tower's ``embeddings``, ``encoder`` and
``final_layer_norm`` modules, called with an additive mask built here. Works with the
transformers 4.4x layout (``CLIPTextModel.text_model``) and with 5.x (no ``text_model`` level);
either way the checkpoint keys are ``transformer.text_model.*``, as in PathLDM.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ldm.modules.encoders.long_prompt import (
    FrozenLongPromptEncoder,
    causal_padding_bias,
    round_up_to_chunks,
)

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt")
MODEL_FILES = ("config.json", "model.safetensors or pytorch_model.bin")
POSITION_IDS_KEY = "text_model.embeddings.position_ids"


def _download_hint(version: str) -> str:
    repo = version if _looks_like_hub_id(version) else "vinid/plip"
    return (f"On a machine with internet access run `huggingface-cli download {repo} "
            f"--local-dir DIR` (or `hf download {repo} --local-dir DIR`), copy DIR here and pass "
            f"it as `version` (cond_stage_config.params.version=DIR).")


def _looks_like_hub_id(version: str) -> bool:
    parts = version.split("/")
    return (len(parts) == 2 and all(parts) and not version.startswith((".", "~"))
            and "\\" not in version)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_source(version: str | os.PathLike) -> tuple[str, bool]:
    """``(source, local_files_only)`` for a local directory or a hub id; clear error otherwise."""
    path = Path(version).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise NotADirectoryError(f"text encoder `version` must be a directory or a hub id, got "
                                 f"the file {path}")
    if not _looks_like_hub_id(str(version)):
        raise FileNotFoundError(
            f"text encoder directory not found: {path}. It must hold a transformers CLIP text "
            f"model ({', '.join(MODEL_FILES)}) and its tokenizer ({', '.join(TOKENIZER_FILES)}, "
            f"tokenizer_config.json). " + _download_hint(str(version)))
    return str(version), hub_offline()


def _missing_files(source: str, local: bool, names: tuple[str, ...],
                   cache_dir: str | None) -> list[str]:
    if Path(source).is_dir():
        return [n for n in names if not (Path(source) / n).is_file()]
    from huggingface_hub import try_to_load_from_cache

    return [n for n in names
            if not isinstance(try_to_load_from_cache(source, n, cache_dir=cache_dir), str)]


def load_clip_tokenizer(source: str, local_only: bool, vocab_size: int,
                        cache_dir: str | None = None):
    """Load the CLIP BPE tokenizer and fail clearly if it is missing or silently empty."""
    from transformers import AutoTokenizer, CLIPTokenizer

    errors = []
    tokenizer = None
    for cls in (CLIPTokenizer, AutoTokenizer):
        try:
            tokenizer = cls.from_pretrained(source, local_files_only=local_only,
                                            cache_dir=cache_dir)
            break
        except Exception as err:  # noqa: BLE001 - reported below with the fix
            errors.append(f"{cls.__name__}: {type(err).__name__}: {err}")
    size = len(tokenizer) if tokenizer is not None else 0
    bad_specials = tokenizer is not None and (
        tokenizer.bos_token_id is None or tokenizer.eos_token_id is None
        or max(tokenizer.bos_token_id, tokenizer.eos_token_id) >= vocab_size)
    if tokenizer is None or size < vocab_size or bad_specials:
        missing = _missing_files(source, local_only, TOKENIZER_FILES, cache_dir)
        what = (f"loaded an empty tokenizer ({size} tokens, the text model has {vocab_size})"
                if tokenizer is not None else "could not load the tokenizer")
        raise OSError(
            f"{source}: {what}. The CLIP BPE tokenizer needs {' and '.join(TOKENIZER_FILES)}"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (" (local files only: nothing was downloaded)" if local_only else "") + ". "
            + _download_hint(source) + ("\n" + "\n".join(errors) if errors else ""))
    return tokenizer


def load_clip_text_model(source: str, local_only: bool, cache_dir: str | None = None):
    """Load ``CLIPTextModel`` (also from a full CLIP checkpoint); fail if weights are missing."""
    from transformers import CLIPTextModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIP checkpoint lists every vision key otherwise
    try:
        model, info = CLIPTextModel.from_pretrained(source, local_files_only=local_only,
                                                    cache_dir=cache_dir,
                                                    output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        missing = _missing_files(source, local_only, ("config.json",), cache_dir)
        where = ("" if Path(source).is_dir() else
                 " (not a local directory; tried it as a hub id"
                 + (" with HF_HUB_OFFLINE set" if local_only else "") + ")")
        raise OSError(f"{source}: could not load the CLIP text model{where}: "
                      f"{type(err).__name__}: {err}. Expected {', '.join(MODEL_FILES)}"
                      + (f"; missing: {', '.join(missing)}" if missing else "") + ". "
                      + _download_hint(source)) from err
    finally:
        hf_logging.set_verbosity(verbosity)
    unused = info.get("unexpected_keys", ())
    if unused:
        logger.info("%s: %d weights not used by the text tower (vision tower, projections)",
                    source, len(unused))
    absent = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    if absent:
        raise OSError(f"{source}: the checkpoint lacks {len(absent)} text-model weights (e.g. "
                      f"{sorted(absent)[:5]}); refusing to run a partly random text encoder")
    return model


class CLIPTextTower(nn.Module):
    """Holds a transformers CLIP text transformer as ``text_model`` and runs long prompts on it."""

    def __init__(self, clip_text_model: nn.Module) -> None:
        super().__init__()
        # transformers 4.x: CLIPTextModel.text_model is the transformer; 5.x: the model is
        self.text_model = getattr(clip_text_model, "text_model", clip_text_model)
        embeddings = self.text_model.embeddings
        # persistent only in old transformers: make it non-persistent so keys never depend on it
        embeddings.register_buffer("position_ids", embeddings.position_ids.clone(),
                                   persistent=False)
        self.chunk_length = embeddings.position_embedding.num_embeddings
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings per chunk (positions restart), concatenated."""
        chunks = input_ids.split(self.chunk_length, dim=-1)
        return torch.cat([self.text_model.embeddings(input_ids=c) for c in chunks], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state after the final layer norm, ``(B, L, D)``."""
        hidden = self.embed(input_ids)
        bias = causal_padding_bias(attention_mask, hidden.dtype)
        hidden = self.text_model.encoder(inputs_embeds=hidden, attention_mask=bias)[0]
        return self.text_model.final_layer_norm(hidden)


def _drop_position_ids(module, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    key = prefix + POSITION_IDS_KEY
    value = state_dict.pop(key, None)
    if value is None:
        return
    expected = torch.arange(value.shape[-1])
    if value.numel() and not torch.equal(value.reshape(-1).cpu().long(), expected):
        logger.warning("%s holds non-standard position ids; ignored (positions are 0..%d)",
                       key, value.shape[-1] - 1)
    else:
        logger.info("ignored %s (a fixed buffer, not a weight)", key)


class FrozenCLIPEmbedder(FrozenLongPromptEncoder):
    """PathLDM's frozen CLIP/PLIP text encoder with 154-token prompts, ``(B, 154, D)`` output.

    ``version`` is a hub id (``vinid/plip``, ``openai/clip-vit-base-patch32``) or a local
    directory; ``device`` is accepted for config compatibility and ignored (outputs follow the
    module's device). Embeddings are cached per caption (``cache_size`` entries at most,
    ``cache_max_bytes`` in total; 0 entries disables the cache). ``tokenizer_version`` reads
    the tokenizer from elsewhere than ``version`` (a diffusers folder keeps it apart).
    """

    def __init__(self, version: str = "vinid/plip", device: str | None = None,
                 max_length: int = 154, cache_size: int = 4096,
                 cache_max_bytes: int | None = 1 << 30, cache_dir: str | None = None,
                 tokenizer_version: str | None = None) -> None:
        super().__init__(cache_size=cache_size, cache_max_bytes=cache_max_bytes)
        source, local_only = resolve_source(version)
        model = load_clip_text_model(source, local_only, cache_dir=cache_dir)
        tok_source, tok_local = (resolve_source(tokenizer_version) if tokenizer_version
                                 else (source, local_only))
        self.tokenizer = load_clip_tokenizer(tok_source, tok_local, model.config.vocab_size,
                                             cache_dir=cache_dir)
        self.transformer = CLIPTextTower(model)
        self.version = str(version)
        # the tokenizer's model_max_length may be absent (PLIP): use the position table (77)
        self.clip_max_length = self.transformer.chunk_length
        self.max_length = round_up_to_chunks(max_length, self.clip_max_length)
        self.bos_id = int(self.tokenizer.bos_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.freeze()
        logger.info("text encoder %s: %d tokens as %d chunks of %d, width %d", self.version,
                    self.max_length, self.max_length // self.clip_max_length,
                    self.clip_max_length, model.config.hidden_size)

    def text_token_ids(self, texts: list[str]) -> list[list[int]]:
        """CLIP BPE ids without BOS/EOS (no truncation here; see :meth:`tokenize`)."""
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
