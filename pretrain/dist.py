"""Process-group facts in one place, safe to call before (or without) torch.distributed init.

Every rank-0-only side effect (printing, writing files, W&B) goes through `is_main()`;
collectives are called on every rank.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()
