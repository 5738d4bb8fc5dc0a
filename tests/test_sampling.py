"""EpochSampler: seeded epoch order, DDP sharding, mid-epoch resume, (epoch, index) keys."""
import pytest
import torch
from tcga_store import random_store
from torch.utils.data import DataLoader, DistributedSampler

from ldm.data.sampling import EpochSampler
from ldm.data.tcga import TCGAPatchData, TCGAPatchDataset

DATA = list(range(10))


def test_epoch_order_is_distributed_samplers_and_changes_per_epoch():
    ours, reference = EpochSampler(DATA, seed=7), DistributedSampler(DATA, 1, 0, seed=7)
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert list(ours) == list(reference)
    ours.set_epoch(0)
    first = list(ours)
    ours.set_epoch(1)
    assert sorted(first) == DATA and list(ours) != first


def test_shards_cover_the_dataset_once_per_epoch():
    shards = [list(EpochSampler(DATA, seed=1, num_replicas=2, rank=r, drop_last=True))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == DATA


def test_resume_skips_the_consumed_part_of_its_epoch_only():
    full = EpochSampler(DATA, seed=3)
    full.set_epoch(2)
    epoch2 = list(full)
    resumed = EpochSampler(DATA, seed=3)
    resumed.resume(2, consumed=4)
    assert resumed.epoch == 2 and list(resumed) == epoch2[4:]
    assert list(resumed) == epoch2  # the next iteration is a whole epoch again
    resumed.resume(2, consumed=4)
    resumed.set_epoch(3)  # a pending position does not carry over to another epoch
    full.set_epoch(3)
    assert list(resumed) == list(full)
    assert len(resumed) == 10  # Lightning counts the epoch's batches from the full length


def test_resume_at_the_end_of_an_epoch_starts_the_next():
    sampler = EpochSampler(DATA, seed=0)
    sampler.resume(1, consumed=10)
    reference = EpochSampler(DATA, seed=0)
    reference.set_epoch(2)
    assert sampler.epoch == 2 and list(sampler) == list(reference)
    with pytest.raises(ValueError, match="consumed"):
        sampler.resume(0, consumed=-1)


def test_keyed_samples_do_not_depend_on_torch_rng_or_workers(tmp_path):
    ds = TCGAPatchDataset(random_store(tmp_path / "s.h5", n=8, tile=24), size=16, p_uncond=0.5)
    sampler = EpochSampler(ds, seed=0, keyed=True)
    sampler.set_epoch(1)
    keys = list(sampler)
    assert all(epoch == 1 for epoch, _ in keys) and sorted(i for _, i in keys) == list(range(8))
    torch.manual_seed(0)
    a = ds[keys[0]]
    torch.manual_seed(1)
    b = ds[keys[0]]
    assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    other_epoch = [ds[(2, i)] for _, i in keys]
    same_epoch = [ds[k] for k in keys]
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(same_epoch, other_epoch))
    serial = list(DataLoader(ds, batch_size=4, sampler=sampler))
    parallel = list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2))
    for x, y in zip(serial, parallel, strict=True):
        assert x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])


def test_datamodule_resumes_its_train_loader(tmp_path):
    train = random_store(tmp_path / "train.h5", n=12, tile=24)
    dm = TCGAPatchData(batch_size=2, train={"path": str(train), "size": 16})
    assert dm.state_dict() == {}  # not fitting: nothing to save
    full = torch.cat([b["image"] for b in dm.train_dataloader()])
    dm.load_state_dict({"epoch": 0, "batches": 4})
    assert torch.equal(torch.cat([b["image"] for b in dm.train_dataloader()]), full[8:])
    assert torch.equal(torch.cat([b["image"] for b in dm.train_dataloader()]), full)  # one-shot
