"""Caption embedding cache: bounded LRU, transformer runs once per caption, invalidation."""
import random

import pytest
import torch

from ldm.modules.encoders.cache import EmbeddingCache
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

CAPTIONS = [f"{t} tumor; {l} til; summary number {i} of an invasive carcinoma report"
            for i in range(5) for t in ("low", "high") for l in ("low", "high")]  # 20 captions


class TransformerCalls:
    """Counts real forward passes of the text transformer and the captions they encode."""

    def __init__(self, enc: FrozenCLIPEmbedder) -> None:
        self.calls = 0
        self.rows = 0
        self.handle = enc.transformer.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]


@pytest.fixture
def enc(tiny_clip_dir):
    return FrozenCLIPEmbedder(version=str(tiny_clip_dir), cache_size=64)


def test_lru_evicts_least_recently_used_by_count():
    cache = EmbeddingCache(max_items=3, max_bytes=None)
    for i in range(3):
        cache.put(i, torch.full((2,), float(i)))
    assert cache.get(0) is not None  # 0 becomes most recent
    cache.put(3, torch.zeros(2))
    assert 1 not in cache and all(k in cache for k in (0, 2, 3)) and len(cache) == 3
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get(1) is None and cache.misses == 1


def test_lru_bounded_by_bytes_and_owns_memory():
    cache = EmbeddingCache(max_items=100, max_bytes=3 * 40)
    batch = torch.arange(50.0).reshape(5, 10)  # rows of 40 bytes
    for i, row in enumerate(batch):
        cache.put(i, row)
    assert len(cache) == 3 and cache.nbytes == 120 and 0 not in cache and 1 not in cache
    stored = cache.get(4)
    assert torch.equal(stored, batch[4]) and stored.untyped_storage().nbytes() == 40
    batch.zero_()  # the cache holds copies, not views of the batch
    assert stored.sum() > 0
    cache.put(99, torch.zeros(100))  # larger than the whole budget: not stored
    assert 99 not in cache and len(cache) == 3
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_disabled_cache_stores_nothing():
    assert not EmbeddingCache(max_items=0).enabled
    cache = EmbeddingCache(max_items=0)
    cache.put("a", torch.ones(1))
    assert len(cache) == 0
    with pytest.raises(ValueError, match="cache bounds"):
        EmbeddingCache(max_items=-1)


def test_stream_of_20_captions_runs_the_transformer_at_most_20_times(enc, tiny_clip_dir):
    calls = TransformerCalls(enc)
    rng = random.Random(0)
    batches = [[rng.choice(CAPTIONS) for _ in range(8)] for _ in range(30)]
    outputs = [enc(batch) for batch in batches]
    assert calls.calls <= 20 and calls.rows == 20  # each caption encoded exactly once
    fresh = FrozenCLIPEmbedder(version=str(tiny_clip_dir), cache_size=0)
    reference = fresh(CAPTIONS)
    for batch, out in zip(batches, outputs):
        expected = torch.stack([reference[CAPTIONS.index(c)] for c in batch])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_only_uncached_captions_run_batched_together(enc):
    calls = TransformerCalls(enc)
    a, b, c, d = CAPTIONS[:4]
    enc([a, b])
    assert (calls.calls, calls.rows) == (1, 2)
    out = enc([a, c, b, d, c])
    assert (calls.calls, calls.rows) == (2, 4)  # one call for c and d together
    assert torch.equal(out[1], out[4]) and torch.equal(out[0], enc([a])[0])
    enc([b, a])
    assert calls.calls == 2


def test_capacity_bounds_the_cache(tiny_clip_dir):
    enc = FrozenCLIPEmbedder(version=str(tiny_clip_dir), cache_size=5)
    calls = TransformerCalls(enc)
    enc(CAPTIONS[:5])
    enc(CAPTIONS[:5])
    assert calls.rows == 5 and len(enc.cache) == 5
    enc(CAPTIONS[5:10])  # evicts the first five
    enc(CAPTIONS[:1])
    assert calls.rows == 11 and len(enc.cache) == 5


def test_cache_invalidated_when_weights_change_and_not_saved(enc, tiny_clip_dir):
    before = enc(CAPTIONS[:3])
    assert len(enc.cache) == 3
    sd = enc.state_dict()
    assert all(k.startswith("transformer.") for k in sd)  # the cache is not part of it
    new_sd = {k: v * 1.5 for k, v in sd.items()}
    enc.load_state_dict(new_sd)
    assert len(enc.cache) == 0
    after = enc(CAPTIONS[:3])
    assert not torch.allclose(after, before)
    other = FrozenCLIPEmbedder(version=str(tiny_clip_dir), cache_size=0)
    other.load_state_dict(new_sd)
    torch.testing.assert_close(after, other(CAPTIONS[:3]), rtol=1e-5, atol=1e-6)


def test_entries_cached_in_inference_mode_work_in_training(enc):
    """Lightning validates under inference_mode; cached contexts then feed training steps."""
    with torch.inference_mode():
        enc(CAPTIONS[:2])
    assert not enc.cache.get((CAPTIONS[0], enc.max_length)).is_inference()
    context = enc(CAPTIONS[:2])
    assert not context.is_inference()
    proj = torch.nn.Linear(context.shape[-1], 4)
    proj(context).square().sum().backward()  # saving the context for backward must work
    assert proj.weight.grad is not None


def test_cache_follows_dtype_and_device(enc):
    enc(CAPTIONS[:2])
    enc.double()
    out = enc(CAPTIONS[:2])
    assert out.dtype == torch.float64 and out.device == enc.device
    enc.float()
    assert enc(CAPTIONS[:1]).dtype == torch.float32


@pytest.mark.gpu
def test_cache_returns_tensors_on_the_module_device(enc):
    cpu = enc(CAPTIONS[:2])
    enc.to("cuda")
    out = enc(CAPTIONS[:3])
    assert out.device.type == "cuda" and enc.cache.get((CAPTIONS[0], 154)).device.type == "cuda"
    torch.testing.assert_close(out[:2].cpu(), cpu, rtol=1e-4, atol=1e-5)
