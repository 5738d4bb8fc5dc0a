"""U-Net parity with the CompVis reference: F1 fixtures, cin256-v2 manifest, attention, autocast."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE, load_fixture

from ldm.modules.attention import BasicTransformerBlock, CrossAttention
from ldm.modules.diffusionmodules.openaimodel import (
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    UNetModel,
)
from ldm.modules.diffusionmodules.util import GroupNorm32, timestep_embedding
from ldm.util import count_params, instantiate_from_config

F1_FIXTURES = ["F1_unet_crossattn_s0", "F1_unet_classcond_y_s1", "F1_unet_crossattn_mc64_s2"]
REL_TOL = 1e-5  # of max|ref|, the bar in the reference README for float32 forwards and grads

CIN256_V2_UNET = dict(  # configs/latent-diffusion/cin256-v2.yaml unet_config (= PathLDM's)
    image_size=64, in_channels=3, out_channels=3, model_channels=192,
    attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1,
    use_spatial_transformer=True, transformer_depth=1, context_dim=512,
)


def _stats(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double()
    return torch.stack([t.mean(), t.std(), t.abs().max()])


def _build_from_fixture(fx: dict, **overrides) -> UNetModel:
    config = {"target": fx["config"]["target"], "params": {**fx["config"]["params"], **overrides}}
    model = instantiate_from_config(config)
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def _run_fixture(model: UNetModel, fx: dict) -> dict:
    """Replay ``reference.call`` of an F1 fixture, recording the same outputs."""
    inputs = fx["inputs"]
    stats, hooks = [], []
    for name in fx["outputs"]["block_names"][:-1]:  # the last entry is the final output
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out: stats.append(_stats(out))))
    x = inputs["x"].clone().requires_grad_(True)
    context = inputs.get("context")
    if context is not None:
        context = context.clone().requires_grad_(True)
    out = model(x, inputs["timesteps"], context=context, y=inputs.get("y"))
    for h in hooks:
        h.remove()
    stats.append(_stats(out))
    (out * inputs["grad_weight"]).sum().backward()
    t_emb = timestep_embedding(inputs["timesteps"], model.model_channels)
    # ``emb`` from the fixture's own t_emb: the time MLP is compared without the exp-kernel
    # difference that ``_assert_t_emb_close`` allows for.
    emb = model.time_embed(fx["outputs"]["t_emb"]).detach()
    result = {"out": out.detach(), "t_emb": t_emb, "emb": emb,
              "block_stats_mean_std_absmax": torch.stack(stats), "grad_x": x.grad}
    if context is not None:
        result["grad_context"] = context.grad
    return result


def _assert_close(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    diff = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert diff <= REL_TOL * scale, f"{name}: max abs diff {diff:.3e} > {REL_TOL} * {scale:.3e}"


def _assert_t_emb_close(name: str, got: torch.Tensor, ref: torch.Tensor,
                        timesteps: torch.Tensor) -> None:
    """cos/sin of ``t * exp(...)`` agree up to what a 1-ulp float32 ``exp`` difference makes.

    The frequencies come from a float32 ``exp`` whose last bit depends on the machine's math
    kernels, in the original as in ours (on an AVX-512 Xeon one frequency of the mc64 fixture
    is 1 ulp off the reference); ``t`` magnifies it, and the product may round to a
    neighbouring float: ``3 t 2**-24``, plus the sinusoid's own rounding.
    """
    bound = 4 * timesteps.abs().max().item() * 2.0 ** -24
    diff = (got.double() - ref.double()).abs().max().item()
    assert diff <= max(bound, REL_TOL), f"{name}: max abs diff {diff:.3e} > {bound:.3e}"


@pytest.mark.parametrize("use_checkpoint", [False, True], ids=["plain", "use_checkpoint"])
@pytest.mark.parametrize("name", F1_FIXTURES)
def test_f1_fixture(name: str, use_checkpoint: bool) -> None:
    fx = load_fixture(name)
    model = _build_from_fixture(fx, use_checkpoint=use_checkpoint)
    assert count_params(model) == fx["meta"]["param_count"]
    got, ref = _run_fixture(model, fx), fx["outputs"]
    expected = {"out", "t_emb", "emb", "grad_x", "block_stats_mean_std_absmax"}
    assert expected <= got.keys() and expected <= ref.keys()
    _assert_t_emb_close(f"{name}.t_emb", got["t_emb"], ref["t_emb"], fx["inputs"]["timesteps"])
    for key in sorted(set(ref) - {"block_names", "block_stats_mean_std_absmax", "t_emb"}):
        _assert_close(f"{name}.{key}", got[key], ref[key])
    # Block statistics: mean/std/absmax errors are bounded by the block output's error, so
    # compare each block's row against that block's absmax.
    got_s, ref_s = got["block_stats_mean_std_absmax"], ref["block_stats_mean_std_absmax"]
    assert got_s.shape == ref_s.shape
    bound = REL_TOL * ref_s[:, 2:3]
    bad = ((got_s - ref_s).abs() > bound).nonzero().tolist()
    assert not bad, [(ref["block_names"][i], j) for i, j in bad]


def test_f1_zero_initialised_weights() -> None:
    """Exactly the reference's zero-initialised weights are zero after construction."""
    fx = load_fixture("F1_unet_crossattn_s0")
    torch.manual_seed(0)
    model = UNetModel(**fx["config"]["params"])
    zero = sorted(k for k, v in model.state_dict().items() if k.endswith("weight") and
                  not v.any())
    assert zero == sorted(fx["meta"]["zero_initialised_weights_at_construction"])


@pytest.mark.parametrize("extra", [{}, {"use_checkpoint": True, "legacy": False}],
                         ids=["manifest_params", "use_checkpoint_legacy_false"])
def test_cin256_v2_manifest(extra: dict) -> None:
    """The cin256-v2 / PathLDM U-Net has exactly the reference state_dict (built on meta)."""
    index = json.loads((REFERENCE / "manifests" / "INDEX.json").read_text())
    entry = index["b_cin256-v2_UNetModel"]
    assert entry["unet_params"] == CIN256_V2_UNET
    manifest = json.loads((REFERENCE / "manifests" / entry["file"]).read_text())
    with torch.device("meta"):
        model = UNetModel(**CIN256_V2_UNET, **extra)
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items()}
    ref = {k: (list(shape), dtype) for k, shape, dtype in manifest}
    assert len(manifest) == entry["num_keys"] == 688
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if v != ref[k]} == {}
    assert list(ours) == [k for k, _, _ in manifest]  # registration order too
    assert count_params(model) == entry["num_params_total"] == 400_920_579


def _naive_attention(q, k, v, scale, mask=None):
    """The reference's explicit softmax(q k^T * scale) v, with -finfo.max masking."""
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
    return torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)


@pytest.mark.parametrize("heads,dim_head", [(1, 40), (3, 8)])
def test_cross_attention_matches_naive(heads: int, dim_head: int) -> None:
    attn = CrossAttention(query_dim=24, context_dim=12, heads=heads, dim_head=dim_head)
    x, ctx = torch.randn(2, 7, 24), torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])  # row 1 fully masked
    for m in (None, mask):
        q = attn.to_q(x).unflatten(-1, (heads, dim_head)).transpose(1, 2)
        k = attn.to_k(ctx).unflatten(-1, (heads, dim_head)).transpose(1, 2)
        v = attn.to_v(ctx).unflatten(-1, (heads, dim_head)).transpose(1, 2)
        ref = attn.to_out(_naive_attention(q, k, v, dim_head ** -0.5, m)
                          .transpose(1, 2).reshape(2, 7, -1))
        torch.testing.assert_close(attn(x, ctx, mask=m), ref, rtol=1e-5, atol=1e-6)
    # A fully masked row attends uniformly (as with the reference's -finfo.max fill).
    assert torch.isfinite(attn(x, ctx, mask=mask)).all()


def test_qkv_attention_orders_match_naive() -> None:
    bs, heads, ch, length = 2, 3, 8, 10
    qkv = torch.randn(bs, heads * 3 * ch, length)
    # Legacy: heads split before q/k/v; scale ch^-1/4 on q and on k.
    q, k, v = qkv.reshape(bs * heads, 3 * ch, length).split(ch, dim=1)
    s = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", q * s, k * s).softmax(dim=-1)
    ref = torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)
    torch.testing.assert_close(QKVAttentionLegacy(heads)(qkv), ref, rtol=1e-5, atol=1e-6)
    # New order: q/k/v split before heads.
    q, k, v = (t.reshape(bs * heads, ch, length) for t in qkv.chunk(3, dim=1))
    w = torch.einsum("bct,bcs->bts", q * s, k * s).softmax(dim=-1)
    ref = torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)
    torch.testing.assert_close(QKVAttention(heads)(qkv), ref, rtol=1e-5, atol=1e-6)


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("flag", [False, True])
def test_gradient_checkpoint_recomputes_only_for_backward(flag: bool) -> None:
    block = BasicTransformerBlock(16, 2, 8, context_dim=6, checkpoint=flag)
    calls = _count_calls(block.attn1)
    x, ctx = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 3, 6)
    with torch.no_grad():
        block(x, ctx)
    assert len(calls) == 1  # no recomputation without gradients
    calls.clear()
    out = block(x, ctx)
    out.square().sum().backward()
    assert len(calls) == (2 if flag else 1)
    grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    block.checkpoint, x.grad = not flag, None
    block.zero_grad()
    block(x, ctx).square().sum().backward()
    for a, b in zip(grads, [x.grad] + [p.grad for p in block.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _set_checkpointing(model: UNetModel, flag: bool) -> None:
    for m in model.modules():
        if isinstance(m, ResBlock):
            m.use_checkpoint = flag
        elif isinstance(m, BasicTransformerBlock):
            m.checkpoint = flag


def _fwd_bwd(model: UNetModel, fx: dict) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = fx["inputs"]
    x = inputs["x"].clone().requires_grad_(True)
    out = model(x, inputs["timesteps"], context=inputs["context"])
    (out.float() * inputs["grad_weight"]).sum().backward()
    return out.detach(), x.grad


def test_bf16_autocast_forward_backward() -> None:
    """Under CPU bf16 autocast the U-Net trains: finite, close to fp32, checkpointing exact."""
    fx = load_fixture("F1_unet_crossattn_mc64_s2")
    model = _build_from_fixture(fx, use_checkpoint=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grad_x = _fwd_bwd(model, fx)
    assert out.dtype == torch.bfloat16 and grad_x.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    ref = fx["outputs"]
    for name, got in (("out", out), ("grad_x", grad_x)):
        diff = (got.float() - ref[name]).abs().max()
        assert diff <= 0.05 * ref[name].abs().max(), f"{name}: bf16 off by {diff}"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The recomputation in backward runs under the same autocast state: same gradients.
    model.zero_grad()
    _set_checkpointing(model, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2, grad_x2 = _fwd_bwd(model, fx)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(grad_x2, grad_x, rtol=1e-3, atol=1e-3 * grad_x.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_groupnorm32_computes_in_float32(dtype: torch.dtype) -> None:
    gn = GroupNorm32(32, 64)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 64, 4, 4) * 3 + 1).to(dtype)
    expected = F.group_norm(x.float(), 32, gn.weight, gn.bias, 1e-5).to(dtype)
    assert gn.eps == 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    gn.to(dtype)  # low-precision parameters are upcast too
    expected = F.group_norm(x.float(), 32, gn.weight.float(), gn.bias.float(), 1e-5).to(dtype)
    torch.testing.assert_close(gn(x), expected, rtol=0, atol=0)


def test_unet_constructor_and_forward_errors() -> None:
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(8, 3, 32, 3, 1, [1], num_heads=1, use_spatial_transformer=True)
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        UNetModel(8, 3, 32, 3, 1, [1], num_heads=1, context_dim=8)
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel(8, 3, 32, 3, 1, [1])
    model = UNetModel(8, 3, 32, 3, 1, [], channel_mult=[1], num_heads=1, num_classes=3)
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([3]))


def test_channels_last_matches() -> None:
    """Layout-agnostic: a channels_last model and input give the fixture output."""
    fx = load_fixture("F1_unet_crossattn_s0")
    model = _build_from_fixture(fx).to(memory_format=torch.channels_last)
    inputs = fx["inputs"]
    x = inputs["x"].to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x, inputs["timesteps"], context=inputs["context"])
    _assert_close("out", out, fx["outputs"]["out"])


def test_timestep_embedding_and_codebook_head() -> None:
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 7)  # odd dim: zero-padded
    freqs = torch.exp(-math.log(10000) * torch.arange(3, dtype=torch.float32) / 3)
    args = t[:, None] * freqs
    torch.testing.assert_close(emb[:, :6], torch.cat([args.cos(), args.sin()], dim=-1))
    assert not emb[:, 6].any()
    model = UNetModel(8, 3, 32, 3, 1, [], channel_mult=[1], num_heads=1, n_embed=16)
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 16, 8, 8)


@pytest.mark.parametrize("variant", [
    dict(resblock_updown=True, use_scale_shift_norm=True, num_heads=2),
    dict(use_new_attention_order=True, num_head_channels=16, legacy=False),
    dict(use_spatial_transformer=True, context_dim=8, num_head_channels=16, legacy=False,
         transformer_depth=2, use_checkpoint=True),
], ids=["updown_scaleshift", "new_attention_order", "transformer_depth2"])
def test_unet_variants_train(variant: dict) -> None:
    """Less common CompVis options build and back-propagate to every parameter."""
    model = UNetModel(8, 3, 32, 3, 1, [2], channel_mult=[1, 2], **variant)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    ctx = torch.randn(2, 4, 8) if "context_dim" in variant else None
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([5, 500]), context=ctx)
    assert out.shape == (2, 3, 8, 8)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
