"""DDPM / LatentDiffusion against the CompVis/PathLDM reference (fixture F3) and their contract."""
import copy
import logging

import pytest
import torch
from conftest import load_fixture

from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config

FIXTURE = "F3F4_ldm_schedule_loss_ddim_s0"


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def fx():
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def model(fx):
    m = instantiate_from_config(fx["config"])
    m.load_state_dict(fx["state_dict"], strict=True)
    return m.eval()


def build(fx, **overrides):
    cfg = copy.deepcopy(fx["config"])
    cfg["params"].update(overrides)
    return instantiate_from_config(cfg)


def make_batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 8, 8, 3, generator=g) * 2 - 1,
            "class_label": torch.randint(0, 4, (n,), generator=g)}


def test_class_path_and_state_dict_layout(fx, model):
    assert isinstance(model, LatentDiffusion) and isinstance(model, DDPM)
    sd = model.state_dict()
    assert list(sd) == list(fx["state_dict"])  # same keys in the same order
    for name in SCHEDULE_BUFFERS:
        assert name in sd and name in dict(model.named_buffers())
    assert "lvlb_weights" not in sd and "lvlb_weights" in dict(model.named_buffers())
    assert "logvar" not in sd and isinstance(model.logvar, torch.Tensor)
    assert any(k.startswith("model.diffusion_model.") for k in sd)
    assert model.model.conditioning_key == "crossattn"


@pytest.mark.parametrize("case", ["case0", "case1"])
def test_f3_forward_and_losses_match_reference(fx, model, case):
    inp, ref = fx["inputs"]["F3"]["cases"][case], fx["outputs"]["F3"]["cases"][case]
    q = model.q_sample(inp["x0"], inp["t"], noise=inp["noise"])
    assert torch.equal(q, ref["q_sample"])
    cond = model.get_learned_conditioning({"class_label": inp["class_label"]})
    assert torch.equal(cond, ref["cond"])
    with torch.no_grad():
        assert rel(model.apply_model(q, inp["t"], cond), ref["apply_model"]) <= 1e-5
    for mode, prefix in (("train", "train"), ("eval", "val")):
        getattr(model, mode)()
        with torch.no_grad():
            loss, loss_dict = model.p_losses(inp["x0"], cond, inp["t"], noise=inp["noise"])
        ref_dict = ref[f"p_losses_{mode}_loss_dict"]
        assert list(loss_dict) == list(ref_dict)
        assert list(loss_dict) == [f"{prefix}/loss_simple", f"{prefix}/loss_vlb", f"{prefix}/loss"]
        assert rel(loss, ref[f"p_losses_{mode}_loss"]) <= 1e-5
        for k, v in ref_dict.items():
            assert rel(loss_dict[k], v) <= 1e-5, k
    model.eval()


def test_alt_cosine_schedule_via_register_schedule(fx):
    m = build(fx)
    m.register_schedule(**fx["inputs"]["F3"]["alt_schedules"]["cosine_1000"])
    ref = fx["outputs"]["F3"]["alt_schedules"]["cosine_1000"]
    for name in (*SCHEDULE_BUFFERS, "lvlb_weights"):
        assert torch.equal(getattr(m, name), ref[name]), name


def test_frozen_stages_and_modes(fx, model):
    model.train()
    try:
        assert not model.first_stage_model.training
        assert all(not m.training for m in model.first_stage_model.modules())
        assert not any(p.requires_grad for p in model.first_stage_model.parameters())
        # ClassEmbedder with cond_stage_trainable=True trains with the U-Net
        assert model.cond_stage_model.training
        assert all(p.requires_grad for p in model.cond_stage_model.parameters())
    finally:
        model.eval()
    frozen = build(fx, cond_stage_trainable=False).train()
    assert not frozen.cond_stage_model.training
    assert not any(p.requires_grad for p in frozen.cond_stage_model.parameters())
    opt = frozen.configure_optimizers()
    n_unet = len(list(frozen.model.parameters()))
    assert len(opt.param_groups[0]["params"]) == n_unet
    trainable_opt = build(fx).configure_optimizers()
    assert len(trainable_opt.param_groups[0]["params"]) == n_unet + 1  # + embedding


def test_ema_key_names_and_scope(fx):
    m = build(fx, use_ema=True)
    sd = m.state_dict()
    ema_keys = [k for k in sd if k.startswith("model_ema.")]
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    assert sd["model_ema.decay"].dtype == torch.float32
    assert sd["model_ema.num_updates"].dtype == torch.int32
    assert len(ema_keys) == len(list(m.model.parameters())) + 2
    p = m.model.diffusion_model.input_blocks[0][0].weight
    original = p.detach().clone()
    with torch.no_grad():
        m.model_ema.diffusion_modelinput_blocks00weight.add_(1.0)
    with m.ema_scope("test"):
        torch.testing.assert_close(p.detach(), original + 1.0)
    assert torch.equal(p.detach(), original)


def _original_checkpoint(fx, tmp_path, extra=None):
    sd = dict(fx["state_dict"])
    sd.update({f"inception.Mixed_7c.branch{i}.conv.weight": torch.zeros(2, 2) for i in range(4)})
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update(extra or {})
    path = tmp_path / "pathldm.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, path)
    return path


def test_loads_original_checkpoint_with_fid_and_position_id_keys(fx, tmp_path):
    path = _original_checkpoint(fx, tmp_path)
    m = build(fx)
    report = m.init_from_ckpt(path)
    assert len(report.loaded) == len(fx["state_dict"]) and not report.missing
    assert sum(k.startswith("inception.") for k in report.ignored) == 4
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in report.ignored
    for k, v in m.state_dict().items():
        assert torch.equal(v, fx["state_dict"][k]), k
    # the same through the constructor (CompVis ckpt_path)
    m2 = build(fx, ckpt_path=str(path))
    assert m2.restarted_from_ckpt
    assert torch.equal(m2.cond_stage_model.embedding.weight,
                       fx["state_dict"]["cond_stage_model.embedding.weight"])


def test_checkpoint_with_wrong_keys_fails_clearly(fx, tmp_path):
    path = _original_checkpoint(fx, tmp_path, {"model.diffusion_model.bogus.weight": torch.ones(1)})
    with pytest.raises(RuntimeError, match="bogus"):
        build(fx).init_from_ckpt(path)
    m = build(fx)
    m.init_from_ckpt(path, ignore_keys=["model.diffusion_model.bogus"])


def test_load_only_unet_from_full_and_bare_checkpoints(fx, tmp_path):
    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v for k, v in fx["state_dict"].items() if k.startswith(prefix)}
    for name, sd in (("full", fx["state_dict"]), ("bare", unet)):
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": sd}, path)
        m = build(fx, ckpt_path=str(path), load_only_unet=True)
        for k, v in m.model.diffusion_model.state_dict().items():
            assert torch.equal(v, unet[k]), (name, k)


def test_checkpoint_without_ema_starts_ema_from_loaded_weights(fx, tmp_path):
    path = _original_checkpoint(fx, tmp_path)
    m = build(fx, use_ema=True, ckpt_path=str(path))
    assert list(m.state_dict()) == [k for k in build(fx, use_ema=True).state_dict()]
    assert torch.equal(m.model_ema.diffusion_modelout2weight,
                       fx["state_dict"]["model.diffusion_model.out.2.weight"])


def test_bf16_autocast_unet_while_first_stage_fp32(fx, model):
    seen = {}

    def record(name):
        def hook(mod, args, out):
            seen.setdefault(name, (args[0].dtype, out.dtype))
        return hook

    hooks = [model.model.diffusion_model.register_forward_hook(record("unet")),
             model.first_stage_model.encoder.register_forward_hook(record("encoder")),
             model.first_stage_model.decoder.register_forward_hook(record("decoder"))]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.shared_step(make_batch())
            decoded = model.decode_first_stage(torch.randn(2, 3, 8, 8))
        loss.backward()
        grads = [p.grad for p in model.model.parameters()]
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    assert seen["unet"][1] == torch.bfloat16
    assert seen["encoder"] == (torch.float32, torch.float32)
    assert seen["decoder"] == (torch.float32, torch.float32) and decoded.dtype == torch.float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)


def test_precomputed_latents_skip_the_encoder(fx, model):
    batch = make_batch(3)
    z_ref, c_ref = model.get_input(batch, "image")
    calls = []
    hook = model.first_stage_model.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        latent = model.encode_first_stage(DDPM.get_input(model, batch, "image"))
        calls.clear()
        z, c = model.get_input({"latent": latent, "class_label": batch["class_label"]}, "image")
    finally:
        hook.remove()
    assert not calls
    assert torch.equal(z, z_ref) and torch.equal(c["class_label"], c_ref["class_label"])


def test_scale_by_std_sets_buffer_once_and_respects_checkpoints(fx):
    m = build(fx, scale_by_std=True)
    assert "scale_factor" in m.state_dict() and float(m.scale_factor) == 1.0
    batch = make_batch(4)
    m.on_train_batch_start(batch, 0)
    z = m.encode_first_stage(batch["image"].permute(0, 3, 1, 2).contiguous())
    expected = 1.0 / z.double().flatten().std()
    assert float(m.scale_factor) == pytest.approx(float(expected), rel=1e-6)
    first = float(m.scale_factor)
    m.on_train_batch_start(make_batch(4, seed=1), 0)
    assert float(m.scale_factor) == first  # computed once
    restored = build(fx, scale_by_std=True)
    sd = dict(m.state_dict())
    sd["scale_factor"] = torch.tensor(0.25)
    restored.load_state_dict(sd)
    restored.on_train_batch_start(batch, 0)
    assert float(restored.scale_factor) == 0.25  # from the checkpoint, not recomputed
    z_scaled, _ = restored.get_input(batch, "image")
    torch.testing.assert_close(z_scaled, 0.25 * z)


def test_global_std_identical_on_every_rank(tmp_path):
    from dist_worker import global_std_worker

    torch.multiprocessing.spawn(global_std_worker, nprocs=2,
                                args=(2, str(tmp_path / "init"), str(tmp_path)))
    stds = [torch.load(tmp_path / f"std{r}.pt") for r in range(2)]
    expected = torch.cat([torch.arange(6.0), torch.arange(6.0) + 10]).double().std()
    assert torch.equal(stds[0], stds[1])
    torch.testing.assert_close(stds[0], expected)


def test_unsupported_options_raise(fx):
    with pytest.raises(NotImplementedError, match="split_input_params"):
        build(fx, split_input_params={"ks": [8, 8]})
    with pytest.raises(ValueError, match="conditioning_key 'class_text_hybrid'"):
        build(fx, conditioning_key="class_text_hybrid")
    with pytest.raises(ValueError, match="parameterization"):
        build(fx, parameterization="v")


def test_x0_parameterization_and_l1_loss(fx):
    m = build(fx, parameterization="x0", loss_type="l1").eval()
    batch = make_batch()
    x, c = m.get_input(batch, "image")
    with torch.no_grad():
        loss, loss_dict = m(x, c)
    t = torch.tensor([3, 500])
    noise = torch.randn_like(x)
    cond = m.get_learned_conditioning(c)
    with torch.no_grad():
        out = m.apply_model(m.q_sample(x, t, noise), t, cond)
        expected = (out - x).abs().mean()
        got, _ = m.p_losses(x, cond, t, noise=noise)
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(loss) and list(loss_dict)[0] == "val/loss_simple"


def test_image_space_ddpm_samples(fx):
    unet = copy.deepcopy(fx["config"]["params"]["unet_config"])
    unet["params"].pop("context_dim")
    unet["params"]["use_spatial_transformer"] = False
    m = DDPM(unet, timesteps=4, image_size=8, channels=3, use_ema=False).eval()
    imgs = m.sample(batch_size=2)
    assert imgs.shape == (2, 3, 8, 8) and torch.isfinite(imgs).all()
    loss, loss_dict = m.shared_step(make_batch())
    assert torch.isfinite(loss) and "val/loss" in loss_dict
    log = m.log_images(make_batch(3), N=2)
    assert log["inputs"].shape == log["samples"].shape == (2, 3, 8, 8)
    assert log["diffusion_row"].shape[0] == 3  # a (C, H, W) grid


def test_log_images_class_conditional(fx, model):
    torch.manual_seed(0)
    log = model.log_images(make_batch(3), N=2, ddim_steps=3, unconditional_guidance_scale=1.75,
                           plot_diffusion_rows=True)
    assert {"inputs", "reconstruction", "samples", "diffusion_row"} <= set(log)
    assert "captions" not in log
    for key in ("inputs", "reconstruction", "samples"):
        assert log[key].shape == (2, 3, 8, 8) and log[key].abs().max() <= 1.0


def test_text_conditioning_without_grad_and_captions(fx, tmp_path_factory, caplog):
    from ldm.modules.encoders.tiny import build_tiny_clip_text_encoder

    text_dir = build_tiny_clip_text_encoder(tmp_path_factory.mktemp("tiny_clip"), hidden_size=32)
    cfg = copy.deepcopy(fx["config"])
    cfg["params"].update(cond_stage_key="caption", cond_stage_trainable=False, track_fid=True,
                         cond_stage_config={
                             "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                             "params": {"version": str(text_dir), "max_length": 154}})
    with caplog.at_level(logging.INFO, logger="ldm.models.diffusion.latent_diffusion"):
        m = instantiate_from_config(cfg)
    assert any("scripts/fid.py" in r.message for r in caplog.records)
    assert not any(k.startswith("inception.") for k in m.state_dict())
    captions = ["high tumor; low til; dense sheets of tumor cells", "low tumor; high til; ok"]
    batch = {"image": make_batch()["image"], "caption": captions}
    m.train()
    z, c = m.get_input(batch, "image")
    assert c.shape == (2, 154, 32) and not c.requires_grad
    loss, _ = m.shared_step(batch)
    loss.backward()
    assert all(p.grad is None for p in m.cond_stage_model.parameters())
    m.eval()
    log = m.log_images(batch, N=2, ddim_steps=2)
    assert log["captions"] == captions and log["samples"].shape == (2, 3, 8, 8)
    uc = m.get_unconditional_conditioning(2)
    assert uc.shape == (2, 154, 32)


@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")
def test_lightning_training_updates_unet_only(fx, tmp_path):
    import pytorch_lightning as pl

    m = build(fx, use_ema=True, learning_rate=1e-3, scheduler_config={
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {"warm_up_steps": [2], "f_start": [0.5], "f_max": [1.0], "f_min": [1.0],
                   "cycle_lengths": [10 ** 9]}})
    m.load_state_dict(fx["state_dict"], strict=False)
    unet0 = {k: v.clone() for k, v in m.model.state_dict().items()}
    first0 = {k: v.clone() for k, v in m.first_stage_model.state_dict().items()}
    data = [{k: v[0] for k, v in make_batch(1, seed=i).items()} for i in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3,
                         limit_val_batches=1, num_sanity_val_steps=0,
                         logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(m, train_dataloaders=loader, val_dataloaders=loader)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_step"]) and torch.isfinite(metrics["val/loss"])
    assert "val/loss_ema" in metrics
    assert any(not torch.equal(v, unet0[k]) for k, v in m.model.state_dict().items())
    assert all(torch.equal(v, first0[k]) for k, v in m.first_stage_model.state_dict().items())
    assert not m.first_stage_model.training
    assert int(m.model_ema.num_updates) == 3
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3)  # warm-up of 2 steps done: factor 1.0
