"""First-stage autoencoders: reference fixtures (F2), manifests (a, a2), loading, quantizer."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE, load_fixture
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL, VQModel, VQModelInterface
from ldm.modules.diffusionmodules.model import AttnBlock, Downsample
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl
from ldm.modules.vqvae.quantize import VectorQuantizer, VectorQuantizer2
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5  # reference README: rel = max|diff| / max|ref| for forwards, losses, gradients
IDENTITY = {"target": "torch.nn.Identity"}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _tiny_dd(**kw) -> dict:
    dd = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32,
              ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    dd.update(kw)
    return dd


def _vq_loss(**kw) -> dict:
    params = dict(disc_start=0, lpips_pretrained=False)
    params.update(kw)
    return {"target": "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": params}


# --------------------------------------------------------------------------- F2 fixtures
def _run_f2_reference_call(fx: dict) -> dict:
    """The fixture's ``reference.call`` on our implementation."""
    cfg = fx["config"]
    assert cfg["target"] == "ldm.models.autoencoder.VQModelInterface"
    vqi = instantiate_from_config(cfg).eval()
    vqi.load_state_dict(fx["state_dict"], strict=True)
    x = fx["inputs"]["x"]
    out = {}
    with torch.no_grad():
        h = vqi.encode(x)
        quant, emb_loss, info = vqi.quantize(h)
        out.update(encode_h=h, quantize_quant=quant, quantize_emb_loss=emb_loss,
                   quantize_indices=info[2], quantize_info_0_is_None=info[0] is None,
                   quantize_info_1_is_None=info[1] is None)
        out["decode_h"] = vqi.decode(h)
        out["decode_h_force_not_quantize"] = vqi.decode(h, force_not_quantize=True)
        b, c, hh, ww = h.shape
        out["get_codebook_entry"] = vqi.quantize.get_codebook_entry(info[2].reshape(-1),
                                                                    shape=(b, hh, ww, c))
        vqm = VQModel(**copy.deepcopy(cfg["params"]))
        vqm.load_state_dict(fx["state_dict"], strict=True)
        dec, diff, ind = vqm(x, return_pred_indices=True)
        out.update(vqmodel_forward_dec=dec, vqmodel_forward_diff=diff, vqmodel_forward_ind=ind)
        q2, l2, _ = vqm.encode(x)
        out.update(vqmodel_encode_quant=q2, vqmodel_encode_emb_loss=l2)

    h_leaf = h.detach().clone().requires_grad_(True)
    _, emb_loss, _ = vqi.quantize(h_leaf)
    emb_loss.backward()
    out["grad_emb_loss_wrt_h"] = h_leaf.grad
    out["grad_emb_loss_wrt_codebook"] = vqi.quantize.embedding.weight.grad
    h_leaf2 = h.detach().clone().requires_grad_(True)
    quant, _, _ = vqi.quantize(h_leaf2)
    (quant * fx["inputs"]["grad_weight_q"]).sum().backward()
    out["grad_quant_wrt_h_straight_through"] = h_leaf2.grad
    return out


@pytest.mark.parametrize("name", ["F2_vq_s0", "F2_vq_s1"])
def test_f2_fixture_matches_reference(name):
    fx = load_fixture(name)
    ours = _run_f2_reference_call(fx)
    assert set(ours) == set(fx["outputs"])
    for key, ref in fx["outputs"].items():
        got = ours[key]
        if not torch.is_tensor(ref):
            assert got == ref, key
            continue
        assert got.shape == ref.shape and got.dtype == ref.dtype, (key, got.shape, ref.shape)
        if ref.dtype == torch.int64:
            assert torch.equal(got, ref), f"{key}: indices differ"
        else:
            assert _rel(got, ref) <= REL_TOL, f"{key}: rel {_rel(got, ref):.3g}"


def test_f2_index_shapes_follow_sane_index_shape():
    assert load_fixture("F2_vq_s0")["outputs"]["quantize_indices"].shape == (128,)
    fx = load_fixture("F2_vq_s1")
    assert fx["config"]["params"]["sane_index_shape"]
    ours = _run_f2_reference_call(fx)
    assert ours["quantize_indices"].shape == (2, 6, 6)


def test_forward_of_interface_is_a_full_reconstruction():
    fx = load_fixture("F2_vq_s0")
    vqi = instantiate_from_config(fx["config"]).eval()
    vqi.load_state_dict(fx["state_dict"])
    with torch.no_grad():
        dec, diff, ind = vqi(fx["inputs"]["x"], return_pred_indices=True)
        dec_from_code = vqi.decode_code(ind.reshape(2, 8, 8))
    assert _rel(dec, fx["outputs"]["vqmodel_forward_dec"]) <= REL_TOL
    assert _rel(diff, fx["outputs"]["vqmodel_forward_diff"]) <= REL_TOL
    assert torch.equal(ind, fx["outputs"]["vqmodel_forward_ind"])
    assert _rel(dec_from_code, fx["outputs"]["vqmodel_forward_dec"]) <= REL_TOL


# ----------------------------------------------------------------------------- manifests
def _manifest(name: str) -> list[tuple[str, list[int], str]]:
    return [tuple(e) for e in json.loads((REFERENCE / "manifests" / name).read_text())]


def _signature(model: torch.nn.Module) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()]


def _vq_f4_params() -> dict:
    cfg = OmegaConf.load(ROOT / "configs" / "autoencoder" / "vq_f4_finetune.yaml")
    params = OmegaConf.to_container(cfg.model.params, resolve=True)
    params.pop("ckpt_path")
    return params


def test_manifest_a2_vq_f4_first_stage():
    params = _vq_f4_params()
    params["lossconfig"] = IDENTITY
    with torch.device("meta"):
        model = VQModelInterface(**params)
    assert _signature(model) == _manifest("a2_vq-f4_VQModelInterface_as_first_stage.json")


def test_manifest_a_vq_f4_full_vqmodel_with_loss():
    params = _vq_f4_params()
    params["lossconfig"]["params"]["lpips_pretrained"] = False
    with torch.device("meta"):
        model = VQModel(**params)
    ours, ref = _signature(model), _manifest("a_vq-f4_VQModel.json")
    assert [k for k, *_ in ours] == [k for k, *_ in ref]
    assert ours == ref
    assert sum(k.startswith("loss.") for k, *_ in ours) == 55
    frozen = [n for n, p in model.named_parameters() if n.startswith("loss.perceptual_loss")]
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters()
                              if n.startswith("loss.perceptual_loss"))


@pytest.mark.parametrize("name, target, z_shape, ckpt", [
    ("vq_f4_finetune", "VQModel", (1, 3, 64, 64), "models/first_stage_models/vq-f4/model.ckpt"),
    ("vq_f8_finetune", "VQModel", (1, 4, 32, 32), "models/first_stage_models/vq-f8/model.ckpt"),
    ("kl_f8_sd_vae", "AutoencoderKL", (1, 4, 32, 32), "models/first_stage_models/kl-f8/model.ckpt"),
])
def test_autoencoder_configs_build(name, target, z_shape, ckpt):
    path = ROOT / "configs" / "autoencoder" / f"{name}.yaml"
    header = path.read_text().splitlines()[0]
    assert header.startswith("#") and ckpt in path.read_text()
    cfg = OmegaConf.load(path)
    assert cfg.model.target == f"ldm.models.autoencoder.{target}"
    # vq-f8 trains from scratch as the original tcga_brca_vq_f8.yaml (the CompVis weights serve
    # Table 3 through eval_vae --ckpt)
    assert cfg.model.params.pop("ckpt_path", None) == (None if name == "vq_f8_finetune" else ckpt)
    cfg.model.params.lossconfig.params.lpips_pretrained = False
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    assert model.decoder.z_shape == z_shape and model.monitor == "val/rec_loss"
    assert cfg.data.target == "ldm.data.tcga.TCGAPatchData"
    data = instantiate_from_config(cfg.data)  # datasets are only opened in setup()
    assert data.batch_size == cfg.data.params.batch_size


# ------------------------------------------------------------------------ KL autoencoder
def test_autoencoder_kl_round_trip_shapes():
    dd = _tiny_dd(double_z=True, z_channels=4, ch_mult=[1, 2, 2], attn_resolutions=[])
    model = AutoencoderKL(dd, IDENTITY, embed_dim=4).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = model.encode(x)
        assert isinstance(post, DiagonalGaussianDistribution)
        assert post.mean.shape == post.logvar.shape == (2, 4, 4, 4)
        dec = model.decode(post.sample())
        rec_mode, post2 = model(x, sample_posterior=False)
        torch.manual_seed(3)
        rec_a, _ = model(x)
        torch.manual_seed(3)
        rec_b, _ = model(x)
    assert dec.shape == rec_mode.shape == x.shape
    assert torch.equal(rec_a, rec_b)  # sampling follows the global RNG
    assert torch.allclose(rec_mode, model.decode(post2.mode()).detach())
    assert model.state_dict()["quant_conv.weight"].shape == (8, 8, 1, 1)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(_tiny_dd(), IDENTITY, embed_dim=3)


def test_diagonal_gaussian_distribution():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4).clamp(-3, 3)
    d = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl_ref = torch.distributions.kl_divergence(ref, std_normal).sum([1, 2, 3])
    assert torch.allclose(d.kl(), kl_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(d.kl(d), torch.zeros(3), atol=1e-5)
    other = DiagonalGaussianDistribution(torch.randn(3, 4, 4, 4))
    kl_other = torch.distributions.kl_divergence(
        ref, torch.distributions.Normal(other.mean, other.std)).sum([1, 2, 3])
    assert torch.allclose(d.kl(other), kl_other, rtol=1e-4, atol=1e-4)
    s = torch.randn_like(mean)
    assert torch.allclose(d.nll(s), -ref.log_prob(s).sum([1, 2, 3]), rtol=1e-5, atol=1e-4)
    assert torch.equal(d.mode(), mean)
    big = DiagonalGaussianDistribution(torch.zeros(4000, 2, 1, 1))
    draws = big.sample()
    assert abs(draws.mean().item()) < 0.05 and abs(draws.std().item() - 1) < 0.05
    clamped = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, 100.)], 1))
    assert torch.all(clamped.logvar == 20.0)
    det = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1), deterministic=True)
    assert torch.equal(det.sample(), mean) and det.kl().item() == 0.0
    assert torch.allclose(normal_kl(mean, logvar, 0.0, 0.0).sum([1, 2, 3]), kl_ref,
                          rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- checkpoint loading
def _full_tiny_vqmodel(**kw) -> VQModel:
    return VQModel(_tiny_dd(), _vq_loss(), n_embed=16, embed_dim=3, **kw)


def test_checkpoint_with_loss_keys_loads_into_identity_interface(tmp_path):
    full = _full_tiny_vqmodel()
    loss_keys = [k for k in full.state_dict() if k.startswith("loss.")]
    assert len(loss_keys) == 55
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": full.state_dict(), "global_step": 7}, ckpt)
    vqi = VQModelInterface(embed_dim=3, n_embed=16, ddconfig=_tiny_dd(), lossconfig=IDENTITY,
                           ckpt_path=str(ckpt))
    assert sorted(vqi.load_report.ignored) == sorted(loss_keys)
    assert not vqi.load_report.missing and not vqi.load_report.unexpected
    for k, v in vqi.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k


def test_full_ldm_checkpoint_prefix_is_stripped(tmp_path):
    src = _full_tiny_vqmodel()
    sd = {f"first_stage_model.{k}": v for k, v in src.state_dict().items()
          if not k.startswith("loss.")}
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(3)
    sd["betas"] = torch.zeros(10)
    torch.save({"state_dict": sd}, tmp_path / "ldm.ckpt")
    vqi = VQModelInterface(embed_dim=3, n_embed=16, ddconfig=_tiny_dd(), lossconfig=IDENTITY,
                           ckpt_path=tmp_path / "ldm.ckpt")
    assert set(vqi.load_report.ignored) == {"model.diffusion_model.out.2.weight", "betas"}
    assert torch.equal(vqi.quantize.embedding.weight, src.quantize.embedding.weight)


def test_wrong_checkpoint_fails_clearly(tmp_path):
    other = VQModelInterface(embed_dim=3, n_embed=32, ddconfig=_tiny_dd(), lossconfig=IDENTITY)
    sd = other.state_dict()
    sd["encoder.extra.weight"] = torch.zeros(1)
    del sd["decoder.conv_out.bias"]
    torch.save({"state_dict": sd}, tmp_path / "wrong.ckpt")
    with pytest.raises(RuntimeError) as err:
        VQModelInterface(embed_dim=3, n_embed=16, ddconfig=_tiny_dd(), lossconfig=IDENTITY,
                         ckpt_path=str(tmp_path / "wrong.ckpt"))
    msg = str(err.value)
    assert "wrong.ckpt" in msg and "quantize.embedding.weight" in msg and "(32, 3)" in msg
    assert "decoder.conv_out.bias" in msg and "encoder.extra.weight" in msg
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        VQModelInterface(embed_dim=3, n_embed=16, ddconfig=_tiny_dd(), lossconfig=IDENTITY,
                         ckpt_path=str(tmp_path / "missing.ckpt"))


def test_ignore_keys_and_non_strict_loading(tmp_path):
    src = VQModelInterface(embed_dim=3, n_embed=16, ddconfig=_tiny_dd(), lossconfig=IDENTITY)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "m.ckpt")
    kw = dict(embed_dim=3, n_embed=16, ddconfig=_tiny_dd(), lossconfig=IDENTITY)
    with pytest.raises(RuntimeError, match="missing keys"):
        VQModelInterface(**kw, ckpt_path=tmp_path / "m.ckpt", ignore_keys=["quantize."])
    m = VQModelInterface(**kw, ckpt_path=tmp_path / "m.ckpt", ignore_keys=["quantize."],
                         strict_load=False)
    assert m.load_report.ignored == ["quantize.embedding.weight"]
    assert m.load_report.missing == ["quantize.embedding.weight"]
    assert torch.equal(m.encoder.conv_in.weight, src.encoder.conv_in.weight)


def test_checkpoint_without_loss_keys_initialises_a_training_model(tmp_path):
    src = VQModelInterface(embed_dim=3, n_embed=16, ddconfig=_tiny_dd(), lossconfig=IDENTITY)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "first_stage.ckpt")
    torch.manual_seed(5)
    m = _full_tiny_vqmodel(ckpt_path=tmp_path / "first_stage.ckpt")
    torch.manual_seed(5)
    fresh = _full_tiny_vqmodel()
    assert torch.equal(m.decoder.conv_out.weight, src.decoder.conv_out.weight)
    assert torch.equal(m.loss.discriminator.main[0].weight, fresh.loss.discriminator.main[0].weight)


def test_use_ema_builds_and_loads(tmp_path):
    m = VQModel(_tiny_dd(), IDENTITY, n_embed=16, embed_dim=3, use_ema=True)
    ema_keys = [k for k in m.state_dict() if k.startswith("model_ema.")]
    assert "model_ema.encoderconv_inweight" in ema_keys
    assert "model_ema.quantizeembeddingweight" in ema_keys
    assert "model_ema.decay" in ema_keys and "model_ema.num_updates" in ema_keys
    with torch.no_grad():
        m.model_ema.encoderconv_inweight.add_(1.0)
    before = m.encoder.conv_in.weight.detach().clone()
    with m.ema_scope("test"):
        assert torch.equal(m.encoder.conv_in.weight, before + 1.0)
    assert torch.equal(m.encoder.conv_in.weight, before)
    torch.save({"state_dict": m.state_dict()}, tmp_path / "ema.ckpt")
    kw = dict(embed_dim=3, n_embed=16, ddconfig=_tiny_dd(), lossconfig=IDENTITY,
              ckpt_path=tmp_path / "ema.ckpt")
    plain = VQModelInterface(**kw)
    assert all(k.startswith("model_ema.") for k in plain.load_report.ignored)
    assert len(plain.load_report.ignored) == len(ema_keys)
    with_ema = VQModelInterface(**kw, use_ema=True)
    assert torch.equal(with_ema.model_ema.encoderconv_inweight, before + 1.0)


# ------------------------------------------------------------------------ vector quantizer
def test_quantizer_ties_go_to_first_index_and_legacy_gradients():
    vq = VectorQuantizer2(4, 2, beta=0.25)
    assert VectorQuantizer is VectorQuantizer2
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.]]))
    z = torch.tensor([[[[1.0, 0.0]], [[0.1, 0.9]]]])  # (1, 2, 1, 2): points (1,0.1), (0,0.9)
    z = z.requires_grad_(True)
    z_q, loss, (p, e, ind) = vq(z)
    assert p is None and e is None
    assert ind.tolist() == [0, 1]  # rows 0 and 2 tie for the first point
    n = z.numel()
    mse = ((z_q - z) ** 2).sum() / n
    assert torch.allclose(loss, 1.25 * mse)
    loss.backward()
    zq_ref = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert torch.allclose(z.grad, 2 * (z.detach() - zq_ref) / n)  # encoder term weight 1
    g = vq.embedding.weight.grad
    e0, z0 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.1])
    assert torch.allclose(g[0], 0.25 * 2 * (e0 - z0) / n)  # codebook term weight beta
    assert torch.equal(g[2], torch.zeros(2))
    fixed = VectorQuantizer2(4, 2, beta=0.25, legacy=False)
    fixed.load_state_dict(vq.state_dict())
    z2 = z.detach().clone().requires_grad_(True)
    fixed(z2)[1].backward()
    assert torch.allclose(z2.grad, 0.25 * 2 * (z.detach() - zq_ref) / n)


def test_quantizer_remap_and_index_shapes(tmp_path):
    torch.manual_seed(0)
    used = np.array([5, 2, 7], dtype=np.int64)
    np.save(tmp_path / "used.npy", used)
    plain = VectorQuantizer2(8, 3)
    perm = torch.tensor([3, 5, 0, 7, 2, 6, 1, 4])
    # eight latent vectors, each a codebook row: the indices are exactly ``perm``
    z = plain.embedding.weight.detach()[perm].reshape(2, 2, 2, 3).permute(0, 3, 1, 2)
    _, _, (_, _, ind) = plain(z)
    assert ind.tolist() == perm.tolist()
    extra = VectorQuantizer2(8, 3, remap=str(tmp_path / "used.npy"), unknown_index="extra")
    extra.load_state_dict(plain.state_dict(), strict=False)
    assert extra.re_embed == 4 and extra.unknown_index == 3
    _, _, (_, _, rind) = extra(z)
    assert rind.shape == (8, 1)
    expected = [used.tolist().index(i) if i in used else 3 for i in ind.tolist()]
    assert rind.reshape(-1).tolist() == expected
    back = extra.unmap_to_all(rind.reshape(2, -1))
    exp_back = [i if i in used else int(used[0]) for i in ind.tolist()]  # extra -> pos 0
    assert back.reshape(-1).tolist() == exp_back and rind.reshape(-1).tolist() == expected
    entry = extra.get_codebook_entry(rind.reshape(-1), shape=(2, 2, 2, 3))
    assert torch.equal(entry, plain.get_codebook_entry(torch.tensor(exp_back), (2, 2, 2, 3)))
    fixed_unknown = VectorQuantizer2(8, 3, remap=str(tmp_path / "used.npy"), unknown_index=1,
                                     sane_index_shape=True)
    fixed_unknown.load_state_dict(plain.state_dict(), strict=False)
    _, _, (_, _, sind) = fixed_unknown(z)
    assert sind.shape == (2, 2, 2)
    assert sind.reshape(-1).tolist() == [e if e != 3 else 1 for e in expected]
    assert "used" in extra.state_dict() and "used" not in plain.state_dict()
    rnd = VectorQuantizer2(8, 3, remap=str(tmp_path / "used.npy"))
    rnd.load_state_dict(plain.state_dict(), strict=False)
    assert int(rnd(z)[2][2].max()) < 3
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        VectorQuantizer2(8, 3, remap=str(tmp_path / "nope.npy"))


# --------------------------------------------------------------------------- building blocks
def test_attnblock_matches_explicit_attention_and_downsample_pads_right_bottom():
    torch.manual_seed(0)
    blk = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 3)
    with torch.no_grad():
        h = blk.norm(x)
        q, k, v = blk.q(h).flatten(2), blk.k(h).flatten(2), blk.v(h).flatten(2)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=2)
        ref = x + blk.proj_out(torch.einsum("bcj,bij->bci", v, w).reshape(2, 32, 5, 3))
        assert _rel(blk(x), ref) < 1e-5
        assert blk.norm.eps == 1e-6 and blk.norm.num_groups == 32
    down = Downsample(4, with_conv=True)
    x = torch.randn(1, 4, 8, 8)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
    ref = torch.nn.functional.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    symmetric = torch.nn.functional.conv2d(x, down.conv.weight, down.conv.bias, stride=2,
                                           padding=1)
    with torch.no_grad():
        out = down(x)
    assert out.shape == symmetric.shape == (1, 4, 4, 4)
    assert torch.allclose(out, ref) and not torch.allclose(out, symmetric)


@pytest.mark.gpu
def test_f2_fixture_on_cuda():
    fx = load_fixture("F2_vq_s0")
    vqi = instantiate_from_config(fx["config"]).eval()
    vqi.load_state_dict(fx["state_dict"], strict=True)
    vqi = vqi.cuda()
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            x = fx["inputs"]["x"].cuda()
            h = vqi.encode(x)
            _, _, (_, _, ind) = vqi.quantize(h)
            dec = vqi.decode(h)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.equal(ind.cpu(), fx["outputs"]["quantize_indices"])
    assert _rel(h.cpu(), fx["outputs"]["encode_h"]) <= 1e-4
    assert _rel(dec.cpu(), fx["outputs"]["decode_h"]) <= 1e-4
