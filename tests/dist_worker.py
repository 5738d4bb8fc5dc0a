"""Worker for multi-process tests; kept apart so spawned processes import nothing heavy."""
import torch
import torch.distributed as dist


def global_std_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Compute ``global_std`` of rank-specific data on a gloo group and save the result."""
    from ldm.models.diffusion.distributed import global_std

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        z = torch.arange(6.0).view(2, 3) + 10.0 * rank  # different data on each rank
        torch.save(global_std(z), f"{out_dir}/std{rank}.pt")
    finally:
        dist.destroy_process_group()
