"""torchrun helpers of the commands: process-group set-up, reductions that keep the ranks together, the
share of each rank, broadcasting a name and gathering top-k results on rank 0."""

from __future__ import annotations

import argparse
import os
from collections import Counter

import torch

from ..curvature import collective_device

def start_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); initialises torch.distributed when run by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def run_distributed(command, args: argparse.Namespace, device: torch.device) -> int:
    rank, world, device = start_distributed(device)
    try:
        return command(args, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def sum_over_ranks(counter: Counter, keys: tuple[str, ...], world: int) -> Counter:
    """`counter` with the counts of `keys` summed over the ranks (the other counts are the same on every rank)."""
    if world == 1:
        return counter
    import torch.distributed as dist

    values = torch.tensor([float(counter[k]) for k in keys], dtype=torch.float64, device=collective_device(None))
    dist.all_reduce(values)
    total = Counter(counter)
    for key, value in zip(keys, values.tolist()):
        total[key] = int(value)
    return +total  # drops zero counts


def block(count: int, rank: int, world: int) -> range:
    """The contiguous block of `count` items that rank `rank` of `world` takes."""
    return range(count * rank // world, count * (rank + 1) // world)


def all_ok(ok: bool, world: int) -> bool:
    """True when `ok` holds on every rank (one all-reduce), so that all ranks stop or go on together."""
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=collective_device(None))
    dist.all_reduce(flag)
    return flag.item() == 0


def rank0_name(name: str, world: int) -> str:
    """Rank 0's `name` (ASCII, at most 128 characters) on every rank: a broadcast."""
    if world == 1:
        return name
    import torch.distributed as dist

    width = 128  # bytes: more than any generation name; a collective needs one shape on every rank
    codes = torch.zeros(width, dtype=torch.int64)
    if name:
        codes[:len(name)] = torch.tensor(list(name.encode("ascii")), dtype=torch.int64)
    codes = codes.to(collective_device(None))
    dist.broadcast(codes, src=0)
    return bytes(c for c in codes.cpu().tolist() if c).decode("ascii")


def gather_topk(result, counts: list[int], k: int, rank: int, world: int):
    """Every rank's (values, rows, mean, var) [n, counts[r]] on rank 0, as merge_topk parts; None elsewhere.

    Collectives need one shape on every rank, so each result is padded to k columns; rank 0 cuts the
    padding off again by the counts, which every rank knows from the shard layout."""
    import torch.distributed as dist

    values, rows, mean, var = result
    n, mine = values.shape[0], counts[rank]
    device = collective_device(None)
    floats = torch.zeros(3, n, k, dtype=values.dtype)
    floats[:, :, :mine] = torch.stack([values, mean, var])
    indices = torch.full((n, k), -1, dtype=torch.int64)
    indices[:, :mine] = rows
    floats, indices = floats.to(device), indices.to(device)
    float_list = [torch.empty_like(floats) for _ in range(world)] if rank == 0 else None
    index_list = [torch.empty_like(indices) for _ in range(world)] if rank == 0 else None
    dist.gather(floats, float_list, dst=0)
    dist.gather(indices, index_list, dst=0)
    if rank != 0:
        return None
    return [(f[0, :, :c].cpu(), i[:, :c].cpu(), f[1, :, :c].cpu(), f[2, :, :c].cpu())
            for f, i, c in zip(float_list, index_list, counts) if c > 0]
