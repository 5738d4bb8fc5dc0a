"""scripts/benchmark.py: config handling, the Markdown report, and a tiny end-to-end run."""
import importlib.util
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pathldm.yaml"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("benchmark_script", REPO / "scripts" / "benchmark.py")


@pytest.fixture(scope="module")
def worker():
    return _load("benchmark_worker_script", REPO / "scripts" / "benchmark_worker.py")


def _spec(bench, *argv):
    args = bench.build_parser().parse_args(["--device", "cpu", *argv])
    bench._resolve(args)
    return bench.build_spec(args)


def test_spec_takes_the_unet_and_lr_from_the_config_without_weights(bench):
    spec = _spec(bench, "--config", str(CONFIG))
    cfg = OmegaConf.load(CONFIG).model
    assert "ckpt_path" not in spec["unet"]
    assert spec["unet"]["model_channels"] == cfg.params.unet_config.params.model_channels
    assert spec["unet"]["use_checkpoint"] is False  # the original PathLDM setting
    assert spec["lr"] == cfg.base_learning_rate
    assert spec["params"]["first_stage_config"] == {"target": "torch.nn.Identity"}
    assert spec["params"]["cond_stage_config"] == {"target": "torch.nn.Identity"}
    assert spec["latent"] == [3, 64, 64] and spec["context"] == [154, 512]
    assert (spec["batch"], spec["precision"], spec["steps"]) == (2, "fp32", 5)
    as_config = _spec(bench, "--config", str(CONFIG), "--use-checkpoint", "config")
    assert as_config["unet"]["use_checkpoint"] == cfg.params.unet_config.params.use_checkpoint


def test_bad_arguments_fail_clearly(bench, tmp_path):
    with pytest.raises(ValueError, match="--measure"):
        _spec(bench, "--measure", "train,fly")
    with pytest.raises(FileNotFoundError, match="openaimodel.py"):
        _spec(bench, "--reference-src", str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {target: x, params: {}}\n")
    with pytest.raises(KeyError, match="unet_config"):
        _spec(bench, "--config", str(bad))


def test_markdown_update_replaces_only_its_own_section(bench, tmp_path):
    out = tmp_path / "b.md"
    out.write_text("# Benchmarks\n\nintro kept\n")
    section = lambda key, body: f"<!-- benchmark:{key} -->\n{body}\n<!-- /benchmark:{key} -->\n"  # noqa: E731
    bench.update_markdown(out, "cpu", section("cpu", "first"))
    bench.update_markdown(out, "gpu", section("gpu", "other"))
    bench.update_markdown(out, "cpu", section("cpu", "second"))
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro kept\n")
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- benchmark:cpu -->") == 1
    assert text.index("second") < text.index("other")  # replaced in place
    assert not out.with_suffix(".md.tmp").exists()


def test_recorded_command_carries_the_allocator_settings_without_machine_paths(bench):
    environ = {"MALLOC_TRIM_THRESHOLD_": "1", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
               "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /opt/x/libfoo.so",
               "HOME": "/root", "MALLOCX": "ignored"}
    assert bench.allocator_env(environ) == [
        "GLIBC_TUNABLES=glibc.malloc.arena_max=2", "MALLOC_TRIM_THRESHOLD_=1",
        "LD_PRELOAD=libjemalloc.so.2:libfoo.so"]
    assert bench.allocator_env({"PATH": "/bin"}) == []


def _tiny_config(path: Path) -> Path:
    cfg = OmegaConf.load(CONFIG)
    unet = cfg.model.params.unet_config.params
    unet.update(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2],
                num_res_blocks=1, image_size=8, context_dim=16)
    cfg.model.params.image_size = 8
    OmegaConf.save(cfg, path)
    return path


def test_end_to_end_against_a_reference_checkout(bench, tmp_path, capsys):
    """Every measurement on a tiny U-Net; this repository stands in for the original code."""
    out = tmp_path / "bench.md"
    results = bench.main([
        "--config", str(_tiny_config(tmp_path / "tiny.yaml")), "--device", "cpu",
        "--steps", "2", "--warmup", "1", "--ddim-steps", "2", "--context-tokens", "4",
        "--optimizer", "fused", "--reference-src", str(REPO), "--out", str(out)])
    expected = {("ours", "train"), ("reference", "train"), ("ours", "sample"),
                ("ours", "denoise"), ("reference", "denoise")}
    assert set(results) == expected
    for r in results.values():
        assert r["times"] and all(t > 0 for t in r["times"])
        assert r["peak"] >= r["baseline"] > 0
    assert len(results[("ours", "train")]["times"]) == 2
    assert results[("ours", "train")]["note"].startswith("AdamW fused=True, lr ")
    assert results[("reference", "train")]["note"].startswith("AdamW fused=False, lr ")
    assert results[("ours", "train")]["lr"] == results[("reference", "train")]["lr"]
    assert not any(r["denormals_flushed"] for r in results.values())  # IEEE unless asked
    assert all(isinstance(results[(i, "train")]["denormals"], int) for i in ("ours", "reference"))
    # Same code on both sides here, so the counted work must agree exactly.
    assert results[("ours", "train")]["flops"] == results[("reference", "train")]["flops"] > 0
    table = capsys.readouterr().out
    assert "training step (fwd+bwd+AdamW): time" in table and "x faster" in table
    assert "conv+matmul FLOPs, rate" in table and "1.000x the work" in table
    text = out.read_text()
    assert "<!-- benchmark:cpu-b2-fp32 -->" in text
    assert "| DDIM 2 steps, guided, DDIMSampler: time | - |" in text
    assert str(REPO) not in text  # the reference path is not written into the report


def test_reference_recomputing_without_autocast_trains_under_bf16(bench, tmp_path):
    """The original's CheckpointFunction drops autocast in backward; the harness must cope."""
    reference = REPO / "tests" / "fixtures" / "compvis_checkpoint_reference"
    results = bench.main([
        "--config", str(_tiny_config(tmp_path / "tiny.yaml")), "--device", "cpu",
        "--precision", "bf16", "--measure", "train", "--steps", "1", "--warmup", "0",
        "--context-tokens", "4", "--reference-src", str(reference)])
    assert set(results) == {("ours", "train"), ("reference", "train")}
    assert all(r["times"] for r in results.values())


@pytest.mark.parametrize("optimizer", ["configured", "fused", "plain"])
def test_ours_trains_at_the_configured_rate_not_the_warm_up_start(bench, worker, tmp_path,
                                                                   optimizer):
    """The never-stepped LambdaLR must not leave ours at 1e-6 x the original's rate."""
    import torch

    spec = _spec(bench, "--config", str(_tiny_config(tmp_path / "tiny.yaml")),
                 "--optimizer", optimizer)
    assert OmegaConf.load(CONFIG).model.params.scheduler_config.params.f_start == [1e-6]
    _, opt = worker._ours(spec, torch.device("cpu"))
    assert [g["lr"] for g in opt.param_groups] == [spec["lr"]] * len(opt.param_groups)
    assert spec["lr"] == OmegaConf.load(CONFIG).model.base_learning_rate


def test_flush_denormal_applies_to_both_implementations(bench, tmp_path):
    out = tmp_path / "bench.md"
    results = bench.main([
        "--config", str(_tiny_config(tmp_path / "tiny.yaml")), "--device", "cpu",
        "--measure", "train", "--steps", "1", "--warmup", "0", "--context-tokens", "4",
        "--reference-src", str(REPO), "--flush-denormal", "--out", str(out)])
    assert set(results) == {("ours", "train"), ("reference", "train")}
    assert all(r["denormals_flushed"] for r in results.values())
    assert all(r["denormals"] is None for r in results.values())  # flushed ones read as 0
    assert "flushed to zero on the CPU in both implementations" in out.read_text()


def test_denormal_count_and_the_flush_probe(worker):
    """Golden count of subnormal values; the probe reads the process's real FPU mode."""
    import torch

    tiny = torch.finfo(torch.float32).tiny
    t = torch.tensor([0.0, tiny, tiny / 2, -tiny / 8, 1.0, -1e-30])
    half = torch.tensor([7e-5, 1e-6, 0.0], dtype=torch.float16)  # float16 tiny is 6.1e-5
    assert worker.denormal_count([t, half]) == 3
    assert worker.denormals_flushed() is False
    try:
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        assert worker.denormals_flushed() is True
    finally:
        torch.set_flush_denormal(False)


def test_dense_flops_count_convolutions_and_matmuls_but_not_attention(worker):
    """Golden count: 2 FLOPs per multiply-add, backward twice the forward, attention left out."""
    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)

    def step():
        h = conv(x).flatten(2).transpose(1, 2)  # (2, 25, 8)
        q = lin(h)  # (2, 25, 16)
        fused = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        explicit = torch.einsum("bij,bjd->bid", torch.einsum("bid,bjd->bij", q, q).softmax(-1), q)
        (fused + explicit).sum().backward()  # the original's attention runs as bmm

    conv_fwd = 2 * (2 * 25) * 8 * (4 * 9)
    lin_fwd = 2 * (2 * 25) * 16 * 8
    assert worker.dense_flops(step) == 3 * (conv_fwd + lin_fwd)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_probe_measures_from_the_resident_size_not_an_earlier_peak(worker):
    """A transient peak before reset() (e.g. while building the model) is not the baseline."""
    import torch

    probe = worker._Probe(torch.device("cpu"))
    big = torch.ones(64, 2 ** 20)  # 256 MiB, touched; large enough to be unmapped on free
    del big
    baseline = probe.reset()
    assert probe.peak() - baseline < 64 * 2 ** 20  # the 256 MiB peak above was forgotten
    again = torch.ones(32, 2 ** 20)  # 128 MiB after the reset
    assert probe.peak() - baseline >= 120 * 2 ** 20
    del again
