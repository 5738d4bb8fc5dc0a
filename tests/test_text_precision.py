"""The frozen text encoder runs in float32 outside autocast: one embedding per caption."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from tiny_ldm import build_tiny_model, tiny_model_config
from torch.utils.data import DataLoader

CAPTION = "high tumor; low til; invasive ductal carcinoma, grade 2, margins free of tumor"


def test_caption_embeds_bitwise_the_same_in_bf16_training_and_fp32_sampling(tiny_clip_dir):
    model = build_tiny_model(tiny_model_config(tiny_clip_dir, use_ema=False))
    seen: list[tuple[torch.Tensor, bool]] = []

    def grab(module, args, kwargs):  # the context the U-Net gets in the training step
        seen.append((kwargs["c_crossattn"][0].detach().clone(),
                     torch.is_autocast_enabled("cpu")))

    model.model.register_forward_pre_hook(grab, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(16, 16, 3, generator=g) * 2 - 1, "caption": CAPTION}] * 2
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, precision="bf16-mixed",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DataLoader(batch, batch_size=2))
    (trained, under_autocast), = seen
    assert under_autocast  # the U-Net did run in bf16-mixed
    assert trained.dtype == torch.float32

    encoder = model.cond_stage_model
    cached = encoder.cache.get((CAPTION, encoder.max_length))
    assert cached is not None and torch.equal(cached, trained[0])
    encoder.clear_cache()  # sampling must compute it afresh, not read the training entry
    with torch.no_grad():
        sampled = model.get_learned_conditioning([CAPTION])
    assert torch.equal(sampled[0], trained[0])
    assert torch.equal(sampled[0], trained[1])

    # the same caption under bf16 autocast, had the encoder obeyed it, is measurably different
    encoder.clear_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ids, mask = encoder.tokenize([CAPTION])
        low = encoder.transformer(ids, mask).float()
    assert not torch.equal(low[0], sampled[0])
