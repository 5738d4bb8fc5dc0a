"""CUDA device placement, checked without a GPU.

Under ``FakeTensorMode`` tensors carry shapes and devices but no data, and an operation that
mixes a CUDA tensor with a CPU one raises, as it does on a GPU. A model built on the CPU and
moved with ``.to()``, as Lightning moves it, runs its forward paths (loss, conditioning, guided
DDIM and PLMS, decoding; the autoencoders' validation losses) on fake CUDA tensors, so a tensor
our code makes on the CPU (a device literal, a table that is not a buffer) fails here. Backward,
autocast and values need a real device; the ``gpu`` tests cover them.
"""
import dataclasses
import itertools

import pytest
import torch
from tiny_ldm import DDCONFIG, build_tiny_model, tiny_model_config
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from ldm.models.autoencoder import AutoencoderKL, VQModel
from ldm.models.diffusion.ddim import DDIMSchedule, model_denoiser, sample_ddim
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.models.diffusion.plms import sample_plms
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

# With an index: for a bare "cuda" Lightning's device property asks the (absent) driver.
CUDA = torch.device("cuda", 0)


def _host_schedule(model: torch.nn.Module, eta: float) -> DDIMSchedule:
    """A 3-step DDIM schedule held as numpy arrays: fake mode cannot read tensor values."""
    s = DDIMSchedule.make(model.alphas_cumprod, 3, eta=eta)
    return dataclasses.replace(s, alphas=s.alphas.numpy(), sigmas=s.sigmas.numpy(),
                               sqrt_one_minus_alphas=s.sqrt_one_minus_alphas.numpy())


def _inputs(key: str, cond: list, uncond: list) -> tuple:
    """The batch's ``key`` entry and the two inputs of ``get_learned_conditioning``."""
    if key != "class_label":
        return cond, cond, uncond
    c, uc = (torch.tensor(v, device=CUDA) for v in (cond, uncond))
    return c, {key: c}, {key: uc}  # the class embedder looks its key up in a batch


def _run_on_fake_cuda(model: torch.nn.Module, key: str, cond, uncond) -> list[torch.Tensor]:
    """Loss, conditioning, DDIM, PLMS and decoding; every output tensor."""
    ddim, plms = _host_schedule(model, eta=1.0), _host_schedule(model, eta=0.0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to(CUDA)
        assert {t.device for t in itertools.chain(model.parameters(), model.buffers())} == {CUDA}
        labels, cond, uncond = _inputs(key, cond, uncond)
        loss, _ = model.shared_step({"image": torch.rand(2, 16, 16, 3, device=CUDA) * 2 - 1,
                                     key: labels})
        c, uc = model.get_learned_conditioning(cond), model.get_learned_conditioning(uncond)
        x_T = torch.randn(2, 3, 8, 8, device=CUDA)
        z_ddim, _ = sample_ddim(model_denoiser(model), x_T, ddim, cond=c, uncond=uc, scale=2.0)
        z_plms, _ = sample_plms(model_denoiser(model), x_T, plms, cond=c, uncond=uc, scale=2.0)
        return [loss, c, uc, z_ddim, z_plms, model.decode_first_stage(z_ddim)]


def test_text_conditional_model_runs_on_cuda_tensors_only(tiny_clip_dir):
    model = build_tiny_model(tiny_model_config(tiny_clip_dir)).eval()
    outs = _run_on_fake_cuda(model, "caption", ["high tumor; low til; a", "low tumor; b"],
                             ["", ""])
    assert [o.device for o in outs] == [CUDA] * 6
    assert outs[1].shape == (2, 154, 32) and outs[-1].shape == (2, 3, 16, 16)


def test_class_conditional_model_runs_on_cuda_tensors_only():
    model = build_tiny_model(tiny_model_config()).eval()
    outs = _run_on_fake_cuda(model, "class_label", [0, 3], [4, 4])
    assert [o.device for o in outs] == [CUDA] * 6


def test_text_embedding_cache_serves_on_the_module_device(tiny_clip_dir):
    enc = FrozenCLIPEmbedder(version=str(tiny_clip_dir), cache_size=8)
    captions = ["high tumor; low til; a", "low tumor; b", "c"]
    enc(captions[:2])  # cached on the CPU
    with FakeTensorMode(allow_non_fake_inputs=True):
        enc.to(CUDA)  # the move empties the cache: no CPU row is served on CUDA
        assert enc(captions).device == CUDA
        assert {enc.cache.get((c, 154)).device for c in captions} == {CUDA}


def test_a_tensor_made_on_the_cpu_is_caught(monkeypatch):
    """The check itself: a loss that draws its noise on the CPU fails, as on a GPU."""
    model = build_tiny_model(tiny_model_config()).eval()
    real = LatentDiffusion.p_losses

    def cpu_noise(self, x_start, cond, t, noise=None):
        return real(self, x_start, cond, t, noise=torch.randn(x_start.shape))

    monkeypatch.setattr(LatentDiffusion, "p_losses", cpu_noise)
    with pytest.raises(FakeTensorDeviceMismatchError, match="cuda:0 and cpu"):
        _run_on_fake_cuda(model, "class_label", [0, 3], [4, 4])


DD = {**DDCONFIG, "attn_resolutions": [8]}  # with the encoder/decoder attention


def _loss(name: str) -> dict:
    return {"target": f"ldm.modules.losses.{name}",
            "params": {"disc_start": 0, "disc_num_layers": 2, "lpips_pretrained": False}}


@pytest.mark.parametrize("make", [
    lambda: VQModel(DD, _loss("vqperceptual.VQLPIPSWithDiscriminator"), n_embed=16,
                    embed_dim=3),
    lambda: AutoencoderKL({**DD, "double_z": True},
                          _loss("contperceptual.LPIPSWithDiscriminator"), embed_dim=3),
], ids=["vq", "kl"])
def test_autoencoder_validation_losses_run_on_cuda_tensors_only(make):
    """Reconstruction, LPIPS and discriminator terms, as validation runs them (no graph)."""
    model = make().eval()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model.to(CUDA)
        x = torch.rand(2, 3, 16, 16, device=CUDA) * 2 - 1
        out = model._reconstruct(x)
        for optimizer_idx in (0, 1):
            loss, log = model._loss_call(x, out, optimizer_idx, "val")
            assert loss.device == CUDA and {v.device for v in log.values()} == {CUDA}
