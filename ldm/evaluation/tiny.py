"""A tiny offline CLIP (image and text towers, random weights) usable as ``--extractor hf:DIR``.

It has PLIP's layout (a Hugging Face ``CLIPModel`` with its image processor and the real CLIP
tokenizer) at a fraction of the size, so the evaluation runs end to end in tests and in the
demo without downloads. Its numbers measure nothing about image quality.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ldm.modules.encoders.tiny import tiny_clip_text_config, write_clip_tokenizer_files

logger = logging.getLogger(__name__)


def build_tiny_clip(out_dir: str | Path, image_size: int = 32, hidden_size: int = 32,
                    projection_dim: int = 16, seed: int = 0) -> Path:
    """Write a random ``CLIPModel`` + processor + tokenizer to ``out_dir`` (kept if present)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
    )

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "preprocessor_config.json").is_file():
        return out_dir
    write_clip_tokenizer_files(out_dir)
    text = tiny_clip_text_config(hidden_size=hidden_size, num_layers=1, num_heads=2,
                                 intermediate_size=2 * hidden_size)
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                              patch_size=image_size // 4, projection_dim=projection_dim)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(
        out_dir)
    logger.info("wrote a tiny random CLIP (%d px, %d-d) to %s", image_size, projection_dim,
                out_dir)
    return out_dir
