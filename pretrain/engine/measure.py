"""Measuring what a rank holds: bytes of live tensors, each storage counted once.

`Engine.memory_breakdown` (and each strategy's version of it) reports memory measured from the
live tensors with these, not computed from formulas: tests and benchmarks compare the two.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank stores: the local shard of a DTensor, else `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of memory actually held by `tensors`: each underlying storage counted once, so
    views into one flat buffer (DeepSpeed's partitions, FSDP's shards) are not double-counted
    and a tied weight counts once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = local_tensor(t)
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
