"""Pluggable image feature extractors for evaluation: Inception, PLIP, CLIP, timm, open_clip, HF.

An extractor is named by a spec:

- ``inception`` (or ``inception:768`` etc.): pytorch-fid's FID Inception, exactly the features
  ``python -m pytorch_fid`` computes (images as they are, [0, 1]; the network resizes).
- ``plip``: the PLIP image tower (``vinid/plip``); ``clip``: OpenAI CLIP ViT-B/32.
- ``hf:<hub id or local dir>``: any Hugging Face vision model (CLIP-like models give their
  projected image embedding, others the pooled output or the CLS token).
- ``timm:<model name, hf-hub:<id> or local dir>[,key=value...]``: a timm model without its
  classifier; ``key=value`` pairs go to ``timm.create_model`` (e.g. UNI's
  ``init_values=1e-5,dynamic_img_size=True``).
- ``open_clip:<model>@<pretrained tag or weights file>`` or ``open_clip:hf-hub:<id>``.

Preprocessing (resize, crop, normalisation) follows each model's own config. Weights are
loaded the way users load them (hub cache or local path); missing weights raise
:class:`FeatureWeightsNotFound` with what to do. CLIP-like extractors also embed text
(:attr:`Extractor.encode_text`), which prompt adherence uses.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

logger = logging.getLogger(__name__)

ALIASES = {"plip": "hf:vinid/plip", "clip": "hf:openai/clip-vit-base-patch32"}
TEXT_BATCH = 64


class FeatureWeightsNotFound(FileNotFoundError):
    """An extractor's weights are neither local nor in the hub cache (and cannot be fetched)."""


@dataclass
class Extractor:
    """A loaded feature extractor: PIL image -> tensor -> ``(B, dims)`` features."""

    spec: str
    preprocess: Callable[[Image.Image], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    provenance: dict[str, Any] = field(default_factory=dict)
    encode_text: Callable[[Sequence[str]], torch.Tensor] | None = None


def file_tag(spec: str) -> str:
    """An extractor spec as a file-name-safe tag (``features_<tag>.npz``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec).strip("_")


def state_dict_hash(module: torch.nn.Module) -> str:
    """SHA-256 over parameter/buffer names and bytes: the identity of the weights used."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _missing(spec: str, source: str, error: Exception) -> FeatureWeightsNotFound:
    return FeatureWeightsNotFound(
        f"extractor {spec!r}: weights for {source!r} are not available ({error}).\n"
        f"  fix: on a machine with internet run `huggingface-cli download {source}` (or the "
        "library's own download) so they land in the local cache, or download them and pass "
        "the local directory (e.g. --extractor hf:/path/to/model); gated models (UNI, CONCH, "
        "Virchow) need an accepted licence and `huggingface-cli login` first")


def load_extractor(spec: str, device: torch.device | str = "cpu",
                   inception_weights: str | Path | None = None,
                   allow_download: bool = False) -> Extractor:
    """Build the extractor of ``spec`` on ``device`` (see the module docstring for specs)."""
    device = torch.device(device)
    full = ALIASES.get(spec, spec)
    kind, _, source = full.partition(":")
    loaders = {"inception": _inception, "hf": _hf, "timm": _timm, "open_clip": _open_clip}
    if kind not in loaders or (kind != "inception" and not source):
        raise ValueError(f"unknown extractor {spec!r}; use inception[:dims], plip, clip, "
                         "hf:<id or dir>, timm:<name or dir>, open_clip:<model>@<pretrained>")
    folder = source.split(",")[0] if kind == "timm" else source
    if folder.startswith(("/", "./", "../", "~")) and not Path(folder).expanduser().is_dir():
        raise FeatureWeightsNotFound(f"extractor {spec!r}: local model directory {folder} does "
                                     "not exist (give the folder holding config.json and the "
                                     "weights, or a hub id)")
    ext = loaders[kind](spec, source, device, inception_weights, allow_download)
    ext.provenance.setdefault("spec", spec)
    return ext


def _inception(spec: str, source: str, device: torch.device, weights: Any,
               allow_download: bool) -> Extractor:
    from torch.nn.functional import adaptive_avg_pool2d

    from ldm.evaluation.fid import FID_WEIGHTS_FILE, load_inception
    from ldm.evaluation.images import pil_to_tensor

    dims = int(source or 2048)
    model = load_inception(dims, weights=weights, allow_download=allow_download, device=device)

    def embed(x: torch.Tensor) -> torch.Tensor:
        pred = model(x)[0]
        if pred.shape[2] != 1 or pred.shape[3] != 1:
            pred = adaptive_avg_pool2d(pred, output_size=(1, 1))
        return pred.flatten(1)

    prov = {"name": f"pytorch-fid InceptionV3 ({FID_WEIGHTS_FILE})", "dims": dims,
            "weights_sha256": state_dict_hash(model),
            "preprocessing": "images as they are, [0, 1]; the network resizes to 299 "
                             "(bilinear) and scales to [-1, 1], as pytorch-fid"}
    return Extractor(spec, pil_to_tensor, embed, device, prov)


def _pooled(out: Any) -> torch.Tensor:
    """A vision model output's image embedding.

    A tensor as it is (CLIP's projected embedding); a transformer's CLS token (its pooler, as
    in ViT/Phikon, may be untrained); a convolutional model's pooled output.
    """
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is not None and hidden.ndim == 3:
        return hidden[:, 0]
    return out.pooler_output.flatten(1)


def _hf(spec: str, source: str, device: torch.device, weights: Any,
        allow_download: bool) -> Extractor:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source)
        processor = transformers.AutoImageProcessor.from_pretrained(source)
        if getattr(config, "model_type", "") == "clip":
            model = transformers.CLIPModel.from_pretrained(source)
        else:
            model = transformers.AutoModel.from_pretrained(source)
    except OSError as e:
        raise _missing(spec, source, e) from None
    model = model.eval().to(device)
    clip_like = hasattr(model, "get_image_features") and hasattr(model, "get_text_features")

    def preprocess(img: Image.Image) -> torch.Tensor:
        return processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def embed(x: torch.Tensor) -> torch.Tensor:
        if clip_like:
            out = model.get_image_features(pixel_values=x)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return _pooled(model(pixel_values=x))

    encode_text = None
    if clip_like:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        max_len = int(getattr(config.text_config, "max_position_embeddings", 77))

        def encode_text(texts: Sequence[str]) -> torch.Tensor:
            tok = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt").to(device)
            out = model.get_text_features(**tok)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    prov = {"name": f"Hugging Face {type(model).__name__} {source}",
            "weights_sha256": state_dict_hash(model),
            "preprocessing": processor.to_dict() if hasattr(processor, "to_dict") else None}
    return Extractor(spec, preprocess, embed, device, prov, encode_text)


def _timm(spec: str, source: str, device: torch.device, weights: Any,
          allow_download: bool) -> Extractor:
    import timm
    from timm.data import create_transform, resolve_data_config

    source, kwargs = split_kwargs(source)
    name = f"local-dir:{source}" if Path(source).is_dir() else source
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as e:  # hub cache miss offline, missing file
        raise _missing(spec, source, e) from None
    model = model.eval().to(device)
    data_config = resolve_data_config({}, model=model)
    transform = create_transform(**data_config, is_training=False)
    prov = {"name": f"timm {source}", "weights_sha256": state_dict_hash(model),
            "preprocessing": {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in data_config.items()}}
    return Extractor(spec, lambda img: transform(img.convert("RGB")), model, device, prov)


def split_kwargs(source: str) -> tuple[str, dict[str, Any]]:
    """``name,key=value,...`` to the name and keyword arguments (values as Python literals)."""
    import ast

    name, *pairs = source.split(",")
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"extractor argument {pair!r} of {source!r} is not key=value")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def _open_clip(spec: str, source: str, device: torch.device, weights: Any,
               allow_download: bool) -> Extractor:
    import open_clip

    model_name, _, pretrained = source.partition("@")
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained or None)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError) as e:
        raise _missing(spec, source, e) from None
    model = model.eval().to(device)

    def encode_text(texts: Sequence[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(list(texts)).to(device))

    prov = {"name": f"open_clip {source}", "weights_sha256": state_dict_hash(model),
            "preprocessing": repr(transform)}
    return Extractor(spec, lambda img: transform(img.convert("RGB")), model.encode_image,
                     device, prov, encode_text)


class _Preprocessed(Dataset):
    """``preprocess(transform(load(i)))`` of an image source (see ldm.evaluation.sources)."""

    def __init__(self, load: Callable[[int], Image.Image], n: int,
                 preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.load, self.n, self.preprocess = load, n, preprocess

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(self.load(i))


@torch.no_grad()
def extract(extractor: Extractor, load: Callable[[int], Image.Image], n: int,
            batch_size: int = 50, num_workers: int = 0, desc: str = "features") -> np.ndarray:
    """``(n, dims)`` float64 features of images ``load(0) .. load(n - 1)``."""
    if n == 0:
        raise ValueError("no images to extract features from")
    loader = DataLoader(_Preprocessed(load, n, extractor.preprocess),
                        batch_size=min(batch_size, n), shuffle=False, num_workers=num_workers)
    chunks = [extractor.embed(batch.to(extractor.device)).float().cpu().numpy()
              .astype(np.float64) for batch in tqdm(loader, desc=desc, unit="batch")]
    return np.concatenate(chunks, axis=0)


@torch.no_grad()
def embed_texts(extractor: Extractor, texts: Sequence[str]) -> np.ndarray:
    """``(len(texts), dims)`` text embeddings of a CLIP-like extractor (float64)."""
    if extractor.encode_text is None:
        raise ValueError(f"extractor {extractor.spec!r} has no text tower (use plip, clip, a "
                         "CLIP-like hf: model or open_clip:)")
    out = [extractor.encode_text(texts[i:i + TEXT_BATCH]).float().cpu().numpy()
           for i in range(0, len(texts), TEXT_BATCH)]
    return np.concatenate(out, axis=0).astype(np.float64)
