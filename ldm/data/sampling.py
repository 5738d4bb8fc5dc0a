"""Training sampler whose order is a function of (seed, epoch) and that can resume mid-epoch.

A resumed run must see the rest of the interrupted epoch in the same order as an uninterrupted
one, and each sample with the same random choices. :class:`EpochSampler` shuffles (and shards
across DDP ranks) like :class:`torch.utils.data.DistributedSampler`, which Lightning then leaves
in place, and can skip the part of an epoch already trained on. With ``keyed=True`` it yields
``(epoch, index)`` keys so that a dataset can seed each sample's augmentations from its key
instead of from process RNG state, which prefetching and worker processes make irreproducible.
"""
from __future__ import annotations

from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DistributedSampler

SampleKey = tuple[int, int]  # (epoch, dataset index)


def _dist_world() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """Seeded per-epoch shuffling, sharded over ranks, resumable at a sample position.

    Args:
        dataset: the dataset (only its length is used).
        shuffle: a new permutation each epoch (``seed + epoch``); else dataset order.
        seed: must be the same on every rank.
        drop_last: drop the tail that does not divide evenly over ranks (else pad by repeating).
        keyed: yield ``(epoch, index)`` keys instead of bare indices.
        num_replicas, rank: default to the initialised process group, else a single process.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, keyed: bool = False, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        world, own_rank = _dist_world()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas,
                         rank=own_rank if rank is None else rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.keyed = keyed
        self._skip = 0

    def resume(self, epoch: int, consumed: int) -> None:
        """Make the next iteration epoch ``epoch`` without its first ``consumed`` samples.

        ``consumed`` counts this rank's samples. Lightning sets the epoch of its samplers only
        after it has created the resumed iterator, so the epoch is set here too.
        """
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        if consumed >= self.num_samples:  # the epoch was finished: start the next one
            epoch, consumed = epoch + 1, 0
        self.set_epoch(epoch)
        self._skip = consumed

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0  # a pending resume position belongs to its own epoch only
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int | SampleKey]:
        order = list(super().__iter__())[self._skip:]
        self._skip = 0  # one resumed iteration; later ones cover whole epochs
        if self.keyed:
            return iter([(self.epoch, i) for i in order])
        return iter(order)
