"""The commands' torchrun set-up: the process group of a command run by torchrun (and its devices), and the
contiguous share of each rank. The collectives between the ranks are in bayesvlm_ext.distributed."""

from __future__ import annotations

import argparse
import os

import torch


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
    """`command(args, rank, world, device)`'s status, under torchrun's process group (torn down afterwards)."""
    rank, world, device = start_distributed(device)
    try:
        return command(args, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def block(count: int, rank: int, world: int) -> range:
    """The contiguous block of `count` items that rank `rank` of `world` takes."""
    return range(count * rank // world, count * (rank + 1) // world)
