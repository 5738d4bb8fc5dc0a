"""PathLDM text- or class-conditional latent diffusion as a self-contained diffusers pipeline.

This file ships inside an exported model folder; it needs only torch, transformers and
diffusers. Load it with::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(FOLDER_OR_HUB_ID, trust_remote_code=True)
    image = pipe("high tumor; low til; invasive ductal carcinoma").images[0]

Text models encode a caption as PathLDM does: ``[BOS] + text + [EOS] + padding`` to
``max_length`` (154) tokens, split into chunks of the text tower's context length (77) whose
position ids restart, one causal mask over all positions combined with the padding mask, and the
final layer norm. Classifier-free guidance uses the empty caption (class models: the
unconditional class) and batches ``[unconditional, conditional]``; the sampler is the folder's
DDIM scheduler, which equals the training code's DDIM when ``num_inference_steps`` divides the
number of training timesteps.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)


def long_prompt_ids(tokenizer, prompts: Sequence[str], max_length: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``(B, max_length)``, PathLDM's packing."""
    bos, eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
    pad = eos if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    tokens = tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.full((len(tokens), max_length), pad, dtype=torch.long)
    mask = torch.zeros((len(tokens), max_length), dtype=torch.long)
    for row, text in enumerate(tokens):
        seq = [bos, *list(text)[:max_length - 2], eos]
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


def causal_padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias ``(B, 1, L, L)``: key j is visible to query i if ``j <= i`` and not padding."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask.bool()[:, None, :]
    bias = torch.zeros(mask.shape[0], 1, length, length, dtype=dtype, device=mask.device)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class PathLDMPipeline(DiffusionPipeline):
    """DDIM sampling with classifier-free guidance for an exported PathLDM model."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "class_embedder"]

    def __init__(self, unet, vae, scheduler, text_encoder=None, tokenizer=None,
                 class_embedder=None, max_length: int = 154, guidance_scale: float = 1.75):
        super().__init__()
        if (text_encoder is None) == (class_embedder is None):
            raise ValueError("a PathLDM pipeline needs a text encoder or a class embedder")
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, class_embedder=class_embedder)
        self.register_to_config(max_length=max_length, guidance_scale=guidance_scale)

    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Cross-attention context ``(B, max_length, D)`` of captions."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tower = getattr(self.text_encoder, "text_model", self.text_encoder)
        device = tower.embeddings.token_embedding.weight.device
        ids, mask = long_prompt_ids(self.tokenizer, prompts, self.config.max_length)
        ids, mask = ids.to(device), mask.to(device)
        chunk = tower.embeddings.position_embedding.num_embeddings
        hidden = torch.cat([tower.embeddings(input_ids=c) for c in ids.split(chunk, dim=-1)],
                           dim=1)
        hidden = tower.encoder(inputs_embeds=hidden,
                               attention_mask=causal_padding_bias(mask, hidden.dtype))[0]
        return tower.final_layer_norm(hidden)

    @torch.no_grad()
    def encode_class_labels(self, labels: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Cross-attention context ``(B, 1, D)`` of class labels."""
        labels = torch.as_tensor([labels] if isinstance(labels, int) else labels,
                                 device=self.class_embedder.embedding.weight.device).long()
        return self.class_embedder(labels)

    def unconditional_context(self, batch_size: int) -> torch.Tensor:
        """The guidance branch's context: the empty caption or the unconditional class."""
        if self.text_encoder is not None:
            return self.encode_prompt([""] * batch_size)
        return self.encode_class_labels([self.class_embedder.config.unconditional_class]
                                        * batch_size)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """Guided noise prediction ``e_u + s * (e_c - e_u)`` (one batch ``[uc, c]``)."""
        if uncond is None or guidance_scale == 1.0:
            return self.unet(latents, t, encoder_hidden_states=context).sample
        t = torch.cat([t] * 2) if torch.is_tensor(t) and t.ndim else t  # per-sample steps
        out = self.unet(torch.cat([latents] * 2), t,
                        encoder_hidden_states=torch.cat([uncond, context])).sample
        e_uncond, e_cond = out.chunk(2)
        return e_uncond + guidance_scale * (e_cond - e_uncond)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents (VQ models quantize first, as in training)."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def _context(self, prompt, class_labels) -> torch.Tensor:
        if self.text_encoder is not None:
            if prompt is None or class_labels is not None:
                raise ValueError("this is a text-conditional model: pass prompt=, not "
                                 "class_labels=")
            return self.encode_prompt(prompt)
        if class_labels is None or prompt is not None:
            raise ValueError("this is a class-conditional model: pass class_labels= (0-3: "
                             "low/low, low/high, high/low, high/high tumor/TIL), not prompt=")
        return self.encode_class_labels(class_labels)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None,
                 class_labels: int | Sequence[int] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None,
                 eta: float = 0.0, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Sample images for captions (text models) or labels (class models).

        ``guidance_scale`` defaults to the exported model's (1.75, the paper's); ``latents``
        replaces the initial noise; ``output_type`` is ``"pil"``, ``"np"``, ``"pt"`` (in
        [0, 1]) or ``"latent"``.
        """
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        context = self._context(prompt, class_labels)
        context = context.repeat_interleave(num_images_per_prompt, dim=0).to(self.unet.dtype)
        batch = context.shape[0]
        uncond = None if scale == 1.0 else self.unconditional_context(batch).to(context.dtype)
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=context.device,
                                   dtype=context.dtype) * self.scheduler.init_noise_sigma
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(context.device, context.dtype)
        train_steps = self.scheduler.config.num_train_timesteps
        if train_steps % num_inference_steps:
            logger.warning("%d steps do not divide %d training timesteps: the DDIM timesteps "
                           "differ from the training code's sampler (which takes %d steps)",
                           num_inference_steps, train_steps,
                           len(range(0, train_steps, train_steps // num_inference_steps)))
        self.scheduler.set_timesteps(num_inference_steps, device=context.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = self.denoise(self.scheduler.scale_model_input(latents, t), t, context, uncond,
                               scale)
            latents = self.scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
        if output_type == "latent":
            images = latents
        else:
            images = (self.decode_latents(latents) / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
