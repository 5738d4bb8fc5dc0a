"""Latent diffusion (CompVis ``LatentDiffusion``): DDPM on the latents of a frozen autoencoder.

Importable as ``ldm.models.diffusion.ddpm.LatentDiffusion`` (the CompVis class path).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.distributed import global_std
from ldm.models.first_stage import FirstStage
from ldm.modules.encoders.conditioner import Conditioner, ConditionerMixin, SingleEmbedderView
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

# the Conditioner kind of a single embedder, by conditioning_key (apply_model routes a bare
# conditioning to c_concat for "concat", else to c_crossattn, which "adm" reads as y)
SINGLE_EMBEDDER_KIND = {"concat": "concat", "adm": "vector"}


def _fp32(device: torch.device):
    """Disable autocast: the first stage always runs in float32, even under bf16 training."""
    return torch.autocast(device_type=device.type, enabled=False)


def _slice_cond(c: Any, bs: int | None) -> Any:
    """First ``bs`` entries of a conditioning tensor, list or dict (as CompVis' ``c[:bs]``)."""
    if bs is None or c is None:
        return c
    if isinstance(c, Mapping):
        return {k: _slice_cond(v, bs) for k, v in c.items()}
    if isinstance(c, (list, tuple)) or torch.is_tensor(c):
        return c[:bs]
    return c


class LatentDiffusion(DDPM):
    """DDPM in the latent space of ``first_stage_config`` conditioned by ``cond_stage_config``.

    Takes the CompVis constructor arguments (plus PathLDM's ``track_fid``/``fid_path``, which
    are accepted but build nothing: FID is computed by ``scripts/fid.py``) and every
    ``DDPM`` argument as keywords. The first stage is frozen in eval mode; the conditioning
    stage is too unless ``cond_stage_trainable``.
    """

    def __init__(self, first_stage_config: Mapping, cond_stage_config: Mapping | str,
                 num_timesteps_cond: int | None = None, cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: str | None = None, conditioning_key: str | None = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False, track_fid: bool = False,
                 fid_path: str | None = None, split_input_params: Mapping | None = None,
                 *args: Any, **kwargs: Any) -> None:
        if split_input_params is not None:
            raise NotImplementedError("split_input_params (patch-wise encode/decode/denoise) is "
                                      "not supported; remove it from the model config")
        self.num_timesteps_cond = 1 if num_timesteps_cond is None else num_timesteps_cond
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError(f"num_timesteps_cond ({num_timesteps_cond}) exceeds timesteps")
        self.scale_by_std = scale_by_std
        if conditioning_key is None:  # backwards compatibility, as CompVis
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        load_only_unet = kwargs.pop("load_only_unet", False)
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self._scale_factor_ready = not scale_by_std
        self.register_load_state_dict_pre_hook(_mark_scale_factor_restored)
        self.cond_stage_forward = cond_stage_forward
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.clip_denoised = False
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, only_model=load_only_unet)
            self.restarted_from_ckpt = True
        self.track_fid, self.fid_path = track_fid, fid_path
        if track_fid:
            logger.info("track_fid=True: FID is not computed during training; run "
                        "scripts/fid.py on a checkpoint instead")

    # ------------------------------------------------------------------------------ stages
    def register_schedule(self, *args: Any, **kwargs: Any) -> None:
        """DDPM schedule plus the shortened conditioning schedule if ``num_timesteps_cond > 1``."""
        super().register_schedule(*args, **kwargs)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()

    def make_cond_schedule(self) -> None:
        """Timesteps used to noise the conditioning (CompVis ``cond_ids``)."""
        self.cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long)
        ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond))
        self.cond_ids[: self.num_timesteps_cond] = ids.long()

    def instantiate_first_stage(self, config: Mapping) -> None:
        """Build the frozen autoencoder (eval mode, no gradients)."""
        self.first_stage_model = instantiate_from_config(config).eval()
        for param in self.first_stage_model.parameters():
            param.requires_grad = False

    def instantiate_cond_stage(self, config: Mapping | str) -> None:
        """Build the conditioning encoder (frozen unless ``cond_stage_trainable``).

        A :class:`~ldm.modules.encoders.conditioner.Conditioner` decides per embedder
        (``is_trainable``); ``cond_stage_trainable`` then follows its embedders. A single
        embedder is seen through a one-entry view (:attr:`conditioner`) reading
        ``cond_stage_key``, without dropout (the data's ``p_uncond`` drops captions).
        """
        self._single_embedder: SingleEmbedderView | None = None
        if config in ("__is_first_stage__", "__is_unconditional__"):
            if self.cond_stage_trainable:
                raise ValueError(f"cond_stage_trainable cannot be used with {config!r}")
            if config == "__is_unconditional__":
                logger.info("training %s as an unconditional model", type(self).__name__)
                self.cond_stage_model = None
                return
            logger.info("using the first stage also as the conditioning stage")
            stage = self.first_stage_model
        else:
            stage = instantiate_from_config(config)
        if isinstance(stage, Conditioner):
            if self.cond_stage_trainable:
                raise ValueError("with a Conditioner set is_trainable on its embedders, not "
                                 "cond_stage_trainable")
        else:
            self._single_embedder = SingleEmbedderView(
                stage, self._single_input_key(stage),
                SINGLE_EMBEDDER_KIND.get(self.model.conditioning_key, "crossattn"),
                is_trainable=self.cond_stage_trainable, method=self.cond_stage_forward)
        self.cond_stage_model = stage
        self.cond_stage_trainable = self.conditioner.is_trainable

    def _single_input_key(self, stage: nn.Module) -> str:
        """The batch field a single embedder reads: ``cond_stage_key``, or for class labels the
        class embedder's own ``key`` (CompVis handed it the batch to look its key up)."""
        own = getattr(stage, "key", None)
        if self.cond_stage_key == "class_label" and isinstance(own, str):
            return own
        return self.cond_stage_key

    @property
    def conditioner(self) -> ConditionerMixin | None:
        """The conditioning stage as a Conditioner (a single embedder: a one-entry view of
        ``cond_stage_model``); None if the model is unconditional."""
        if self._single_embedder is not None:
            return self._single_embedder
        return self.cond_stage_model

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Switch train/eval mode while the frozen stages stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        if not self.cond_stage_trainable and isinstance(self.cond_stage_model, nn.Module):
            self.cond_stage_model.eval()
        return self

    # ----------------------------------------------------------------------- first stage
    def _first_stage(self) -> FirstStage:
        """The first stage, checked against the contract when it is used (a model that only
        ever sees latents, like the benchmark's, may hold any module there)."""
        stage = self.first_stage_model
        if not isinstance(stage, FirstStage):
            raise TypeError(f"{type(stage).__name__} is not a first stage (no encode_latent/"
                            "latent_from_moments): use VQModelInterface, AutoencoderKL or "
                            "IdentityFirstStage, see ldm.models.first_stage")
        return stage

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """Scaled latent from an ``encode()`` output (a tensor, or a distribution to sample)."""
        if torch.is_tensor(encoder_posterior):
            z = encoder_posterior
        elif callable(getattr(encoder_posterior, "sample", None)):
            z = encoder_posterior.sample()
        else:
            raise TypeError(f"encoder output of type {type(encoder_posterior).__name__} is "
                            "neither a tensor nor a distribution with sample()")
        return self.scale_factor * z

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """First-stage ``encode`` in float32 (pre-quantization latent for VQ models)."""
        with _fp32(x.device):
            return self.first_stage_model.encode(x.float())

    def _decode(self, z: torch.Tensor, predict_cids: bool,
                force_not_quantize: bool) -> torch.Tensor:
        if predict_cids:
            if z.dim() == 4:
                z = torch.argmax(z.exp(), dim=1).long()
            z = self.first_stage_model.quantize.get_codebook_entry(z, shape=None)
            z = z.permute(0, 3, 1, 2).contiguous()
        z = 1.0 / self.scale_factor * z
        with _fp32(z.device):
            return self._first_stage().decode(
                z.float(), force_not_quantize=predict_cids or force_not_quantize)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        """Unscale and decode latents (VQ models re-quantize first) in float32."""
        return self._decode(z, predict_cids, force_not_quantize)

    def differentiable_decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                                          force_not_quantize: bool = False) -> torch.Tensor:
        """:meth:`decode_first_stage` with gradients."""
        return self._decode(z, predict_cids, force_not_quantize)

    # ---------------------------------------------------------------------- conditioning
    def get_conditioning(self, batch: Mapping[str, Any], uncond_keys: Sequence[str] = ()
                         ) -> Any:
        """Encoded conditioning of a batch-like dict (``{"caption": [...], "class_label":
        LongTensor, "summary": [...]}``, see :mod:`ldm.data.captions`); None if unconditional.

        Each embedder reads its own field. Guidance dropout applies in training mode only.
        ``uncond_keys`` (input keys) get their unconditional embedding, for guidance on one
        conditioning at a time.
        """
        if self.conditioner is None:
            return None
        return self.conditioner(self._cond_input(batch), ucg=self.training,
                                uncond_keys=uncond_keys)

    def conditioning_fields(self) -> list[str]:
        """The batch fields :meth:`get_conditioning` reads (empty: unconditional)."""
        if self.conditioner is None:
            return []
        return list(dict.fromkeys(self.conditioner.input_keys))

    def supports_guidance(self) -> bool:
        """Whether the model has an unconditional input for classifier-free guidance."""
        return self.conditioner is not None and all(
            callable(getattr(e, "unconditional_input", None)) for e in self.conditioner)

    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning with the cond stage (guidance dropout in training mode).

        ``c`` is a batch-like dict of the fields the model reads (:meth:`conditioning_fields`),
        or, for a model reading one field, that field's value (captions, class labels, images:
        CompVis' call). A single embedder gives its own output (a tensor), a Conditioner a dict.
        """
        if self.conditioner is None:
            raise RuntimeError("this model is unconditional (no cond_stage_model)")
        if not isinstance(c, Mapping):
            fields = self.conditioning_fields()
            if len(fields) != 1:
                raise TypeError(f"the model reads the fields {fields}: give a batch-like dict, "
                                f"not a {type(c).__name__}")
            c = {fields[0]: c}
        return self.conditioner(c, ucg=self.training)

    def get_unconditional_conditioning(self, batch_size: int) -> Any:
        """Conditioning of the classifier-free-guidance unconditional branch."""
        if self.conditioner is None:
            raise RuntimeError("this model is unconditional (no cond_stage_model)")
        return self.conditioner.unconditional(batch_size)

    def _cond_input(self, batch: Mapping[str, Any], cond_key: str | None = None
                    ) -> dict[str, Any]:
        """The fields the model reads, tensors on its device, images (``ndim >= 3``) channels
        first as :meth:`DDPM.get_input` gives them. ``cond_key``: a field read in place of a
        one-field model's own (CompVis ``get_input(cond_key=...)``)."""
        fields = self.conditioning_fields()
        source = {f: cond_key or f for f in fields}
        if cond_key is not None and len(fields) != 1:
            raise ValueError(f"cond_key {cond_key!r} needs a model reading one field, not "
                             f"{fields}")
        out = {}
        for field, key in source.items():
            if key not in batch:
                raise KeyError(f"batch has no conditioning key {key!r} (keys: {sorted(batch)})")
            value = batch[key]
            if torch.is_tensor(value):
                value = (DDPM.get_input(self, batch, key) if value.ndim >= 3 else value
                         ).to(self.device)
            out[field] = value
        return out

    @torch.no_grad()
    def _first_stage_input(self, batch: Mapping[str, Any], k: str, bs: int | None = None
                           ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Images (None if the batch only has latents) and their scaled latents."""
        x = DDPM.get_input(self, batch, k)[:bs].to(self.device) if k in batch else None
        if "latent" in batch:  # cached encode_moments output
            moments = batch["latent"][:bs].to(self.device).float()
        elif x is None:
            raise KeyError(f"batch has neither {k!r} nor 'latent' (keys: {sorted(batch)})")
        else:
            with _fp32(x.device):
                moments = self._first_stage().encode_moments(x.float())
        # one draw for both paths: a KL posterior is sampled, as in the original's training
        z = self._first_stage().latent_from_moments(moments, sample=True)
        return x, (self.scale_factor * z).detach()

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: str | None = None,
                  return_original_cond: bool = False, bs: int | None = None) -> list:
        """``[z, c]`` (+ ``x, xrec`` and the raw conditioning on request) from a batch.

        ``batch["latent"]`` (cached ``encode_moments`` of the images: a VQ pre-quantization latent
        or a KL posterior's mean and log-variance) skips the encoder; KL latents are sampled.
        The conditioning is encoded here, without gradients, unless the cond stage is trainable.
        """
        x, z = self._first_stage_input(batch, k, bs)
        c = xc = None
        if self.model.conditioning_key is not None:
            xc = _slice_cond(self._cond_input(batch, cond_key), bs)
            c = xc
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc)
        out = [z, c]
        if return_first_stage_outputs:
            xrec = self.decode_first_stage(z)
            out.extend([xrec if x is None else x, xrec])
        if return_original_cond:
            out.append(xc)
        return out

    # ---------------------------------------------------------------------------- model
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any,
                    return_ids: bool = False) -> torch.Tensor:
        """Denoiser output; ``cond`` is a tensor, a list, or a hybrid dict of lists."""
        if not isinstance(cond, Mapping):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        out = self.model(x_noisy, t, **cond)
        if isinstance(out, tuple) and not return_ids:
            out = out[0]
        # under autocast the U-Net returns low precision; the diffusion math stays float32
        return out.to(x_noisy.dtype) if torch.is_tensor(out) else out

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.apply_model(x, t, cond)

    def _noisy_cond(self, cond: Any, ts: torch.Tensor) -> Any:
        if not self.shorten_cond_schedule or cond is None:
            return cond
        if isinstance(cond, Mapping):
            raise NotImplementedError("num_timesteps_cond > 1 noises a conditioning tensor; "
                                      "it does not apply to a Conditioner's outputs")
        tc = self.cond_ids.to(ts.device)[ts]
        return self.q_sample(x_start=cond, t=tc, noise=torch.randn_like(cond.float()))

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Loss at timesteps ``t`` given encoded conditioning ``cond``."""
        return self._p_losses(x_start, cond, t, noise)

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any):
        """Loss at uniformly drawn timesteps (encodes ``c`` here if the cond stage trains)."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError("conditioning is required (conditioning_key="
                                 f"{self.model.conditioning_key!r})")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            c = self._noisy_cond(c, t)
        return self.p_losses(x, c, t, *args, **kwargs)

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any):
        """Loss on a batch."""
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """With ``scale_by_std``: set ``scale_factor = 1/std`` of the first batch's latents."""
        if (self._scale_factor_ready or self.global_step != 0 or batch_idx != 0
                or self.current_epoch != 0):
            return
        if float(self.scale_factor) != 1.0:
            raise ValueError("scale_by_std needs scale_factor=1.0 (rather not use custom "
                             "rescaling and std-rescaling simultaneously)")
        z = self._first_stage_input(batch, self.first_stage_key)[1]
        self.scale_factor.copy_(1.0 / global_std(z))
        self._scale_factor_ready = True
        logger.info("scale_by_std: set scale_factor to %.6f", float(self.scale_factor))

    def _trainable_params(self) -> list[torch.Tensor]:
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            logger.info("%s: also optimizing the conditioner's parameters", type(self).__name__)
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, cond: Any, batch_size: int = 16, return_intermediates: bool = False,
               x_T: torch.Tensor | None = None, verbose: bool = True,
               timesteps: int | None = None, quantize_denoised: bool = False,
               mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               shape: Sequence[int] | None = None, **kwargs: Any):
        """Ancestral sampling over all timesteps (slow; prefer :class:`DDIMSampler`)."""
        shape = shape or (batch_size, self.channels, self.image_size, self.image_size)
        cond = _slice_cond(cond, batch_size)
        img, inter = self._p_sample_loop(shape, cond, x_T=x_T, verbose=verbose,
                                         timesteps=timesteps, quantize_denoised=quantize_denoised,
                                         mask=mask, x0=x0)
        return (img, inter) if return_intermediates else img

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: int, **kwargs: Any):
        """Samples (and intermediates) with DDIM or the ancestral sampler."""
        if ddim:
            shape = (self.channels, self.image_size, self.image_size)
            return DDIMSampler(self).sample(ddim_steps, batch_size, shape, cond, verbose=False,
                                            **kwargs)
        return self.sample(cond=cond, batch_size=batch_size, return_intermediates=True, **kwargs)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 4, sample: bool = True,
                   ddim_steps: int | None = 50, ddim_eta: float = 0.0,
                   unconditional_guidance_scale: float = 1.75,
                   return_keys: Sequence[str] | None = None, plot_diffusion_rows: bool = False,
                   plot_denoise_rows: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Images for an image-logging callback, as tensors in [-1, 1] (EMA weights for samples).

        Keys: ``inputs``, ``reconstruction``, ``samples`` (DDIM with classifier-free guidance
        when the scale is not 1 and the conditioner has an unconditional input), optionally
        ``diffusion_row``/``denoise_row`` grids, and ``captions`` (list of str) for text
        conditioning.
        """
        z, c, x, xrec = self.get_input(batch, self.first_stage_key,
                                       return_first_stage_outputs=True, force_c_encode=True, bs=N)
        N, n_row = min(z.shape[0], N), min(z.shape[0], n_row)
        log: dict[str, Any] = {"inputs": x.clamp(-1, 1), "reconstruction": xrec.clamp(-1, 1)}
        texts = _slice_cond(batch.get("caption"), N)
        if isinstance(texts, (list, tuple)) and all(isinstance(s, str) for s in texts):
            log["captions"] = list(texts)
        if plot_diffusion_rows:
            log["diffusion_row"] = self._diffusion_grid(z[:n_row])
        if sample:
            guide = (unconditional_guidance_scale != 1.0 and c is not None
                     and self.supports_guidance())
            extra = {"unconditional_guidance_scale": unconditional_guidance_scale,
                     "unconditional_conditioning": self.get_unconditional_conditioning(N)
                     } if guide else {}
            with self.ema_scope("Plotting"):
                samples, inter = self.sample_log(cond=c, batch_size=N, ddim=ddim_steps is not None,
                                                 ddim_steps=ddim_steps, eta=ddim_eta, **extra)
            log["samples"] = self.decode_first_stage(samples).clamp(-1, 1)
            if plot_denoise_rows:
                rows = inter["pred_x0"] if isinstance(inter, dict) else inter
                log["denoise_row"] = self._grid([self.decode_first_stage(r).clamp(-1, 1)
                                                 for r in rows])
        if return_keys:
            return {k: v for k, v in log.items() if k in return_keys} or log
        return log

    def _diffusion_grid(self, z_start: torch.Tensor) -> torch.Tensor:
        rows = []
        for t in range(self.num_timesteps):
            if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                ts = torch.full((z_start.shape[0],), t, device=z_start.device, dtype=torch.long)
                rows.append(self.decode_first_stage(self.q_sample(z_start, ts)).clamp(-1, 1))
        return self._grid(rows)

    @staticmethod
    def _grid(rows: list[torch.Tensor]) -> torch.Tensor:
        """One grid row per sample, one column per entry of ``rows``."""
        from torchvision.utils import make_grid

        return make_grid(torch.stack(rows, 1).flatten(0, 1), nrow=len(rows))


def _mark_scale_factor_restored(module: LatentDiffusion, state_dict: Mapping[str, Any],
                                prefix: str, *args: Any) -> None:
    """A checkpoint that carries ``scale_factor`` fixes it: ``scale_by_std`` won't recompute."""
    if prefix + "scale_factor" in state_dict:
        module._scale_factor_ready = True

