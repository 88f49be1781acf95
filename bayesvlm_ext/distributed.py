"""The package's torch.distributed helpers, in one place: which rank and how many, the device a group's
collectives need, and the collectives that keep the ranks together (every rank agrees, counters summed,
rank 0's name broadcast, dicts merged, top-k results gathered on rank 0).

Past one process the package runs on torch.distributed (started by torchrun or the caller's
init_process_group, any backend), never on a protocol of its own. Every helper takes the process group
(None: the world) and, on a group of one rank or without torch.distributed, returns its input without a
collective, so the single-process path needs no process group.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

__all__ = ["distributed_rank", "collective_device", "all_ranks", "sum_over_ranks", "rank0_name", "merged_over_ranks",
           "gather_topk"]


def distributed_rank(distributed: bool | None = None, group=None) -> tuple[int, int]:
    """(rank, world size) for sharding, (0, 1) when not distributed.

    `distributed` None: whenever torch.distributed is initialised and `group` has several ranks; True
    without an initialised torch.distributed is a ValueError."""
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = active and dist.get_world_size(group) > 1
    if not distributed:
        return 0, 1
    if not active:
        raise ValueError("argument 'distributed' is True but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group, or run under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group=None) -> torch.device:
    """The device collectives of `group` need: CUDA for NCCL, else CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks(flag: bool, group=None) -> bool:
    """True when `flag` is True on every rank of `group` (one all-reduce), so that all ranks stop or go on
    together."""
    if distributed_rank(None, group)[1] == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item() == 1.0)


def sum_over_ranks(counter: Counter, keys: tuple[str, ...], group=None) -> Counter:
    """`counter` with the counts of `keys` summed over the ranks (the other counts are the same on every rank)."""
    if distributed_rank(None, group)[1] == 1:
        return counter
    import torch.distributed as dist

    values = torch.tensor([float(counter[k]) for k in keys], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(values, group=group)
    total = Counter(counter)
    for key, value in zip(keys, values.tolist()):
        total[key] = int(value)
    return +total  # drops zero counts


def rank0_name(name: str, group=None) -> str:
    """Rank 0's `name` (ASCII, at most 128 characters) on every rank: a broadcast."""
    if distributed_rank(None, group)[1] == 1:
        return name
    import torch.distributed as dist

    width = 128  # bytes: more than any generation name; a collective needs one shape on every rank
    codes = torch.zeros(width, dtype=torch.int64)
    if name:
        codes[:len(name)] = torch.tensor(list(name.encode("ascii")), dtype=torch.int64)
    codes = codes.to(collective_device(group))
    dist.broadcast(codes, src=_global_rank0(group), group=group)
    return bytes(c for c in codes.cpu().tolist() if c).decode("ascii")


def merged_over_ranks(part: dict, group=None) -> dict:
    """The union of every rank's `part` (picklable keys and values), on every rank: one all_gather_object."""
    world = distributed_rank(None, group)[1]
    if world == 1:
        return part
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, part, group=group)
    return {key: value for each in gathered for key, value in each.items()}


def gather_topk(
    result: tuple[Tensor, Tensor, Tensor, Tensor],  # values, rows (int64), mean, var: [n, counts[rank]] each
    counts: list[int],  # the columns every rank's result has
    k: int,  # at least max(counts)
    group=None,
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]] | None:  # on rank 0: [(values, rows, mean, var)], CPU
    """Every rank's (values, rows, mean, var) [n, counts[r]] on rank 0, as merge_topk parts; None elsewhere.

    Collectives need one shape on every rank, so each result is padded to k columns; rank 0 cuts the
    padding off again by the counts, which every rank knows from the shard layout."""
    import torch.distributed as dist

    rank, world = distributed_rank(None, group)
    values, rows, mean, var = result
    n, mine = values.shape[0], counts[rank]
    if world == 1:
        return [(values.cpu(), rows.cpu(), mean.cpu(), var.cpu())] if mine > 0 else []
    device = collective_device(group)
    floats = torch.zeros(3, n, k, dtype=values.dtype)
    floats[:, :, :mine] = torch.stack([values, mean, var])
    indices = torch.full((n, k), -1, dtype=torch.int64)
    indices[:, :mine] = rows
    floats, indices = floats.to(device), indices.to(device)
    float_list = [torch.empty_like(floats) for _ in range(world)] if rank == 0 else None
    index_list = [torch.empty_like(indices) for _ in range(world)] if rank == 0 else None
    dst = _global_rank0(group)
    dist.gather(floats, float_list, dst=dst, group=group)
    dist.gather(indices, index_list, dst=dst, group=group)
    if rank != 0:
        return None
    return [(f[0, :, :c].cpu(), i[:, :c].cpu(), f[1, :, :c].cpu(), f[2, :, :c].cpu())
            for f, i, c in zip(float_list, index_list, counts) if c > 0]


def _global_rank0(group) -> int:
    """The global rank of `group`'s rank 0 (src and dst of torch.distributed are global ranks)."""
    import torch.distributed as dist

    return 0 if group is None else dist.get_global_rank(group, 0)
