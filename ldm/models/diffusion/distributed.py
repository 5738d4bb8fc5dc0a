"""Statistics reduced over all ranks of a ``torch.distributed`` job (no Lightning needed)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_std(z: torch.Tensor) -> torch.Tensor:
    """Unbiased std of all entries of ``z`` on every rank together (float64, two passes).

    Every rank gets the identical value, so a statistic such as ``scale_by_std``'s scale
    factor agrees across a DDP job (the original computed it on rank 0 only).
    """
    z = z.detach().flatten().double()
    stats = torch.stack([z.new_tensor(float(z.numel())), z.sum()])
    if _distributed():
        dist.all_reduce(stats)
    n, mean = stats[0], stats[1] / stats[0]
    sq = ((z - mean) ** 2).sum()
    if _distributed():
        dist.all_reduce(sq)
    return (sq / (n - 1)).sqrt()
