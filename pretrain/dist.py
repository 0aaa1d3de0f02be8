"""Process-group facts in one place, safe to call before (or without) torch.distributed init.

Every rank-0-only side effect (printing, writing files, W&B) goes through `is_main()`;
collectives are called on every rank. torch.distributed is not imported here: a process
group cannot exist unless something else imported it, and the data-prep CLI starts faster
without it.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _dist() -> Any:
    d = sys.modules.get("torch.distributed")
    return d if d is not None and d.is_available() and d.is_initialized() else None


def initialized() -> bool:
    return _dist() is not None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()
