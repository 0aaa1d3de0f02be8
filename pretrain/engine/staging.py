"""Copies of an engine's state in host memory, for checkpoints written in the background.

A background write must not read tensors that the next optimizer step changes, so the state
is first copied aside ("staged"): this is the only part of an asynchronous save that stalls
training. `Stager.stage(state)` returns a state dict of the same structure (plain tensors,
DTensor shards of FSDP, ShardedTensor fragments of ZeRO, and the non-tensor leaves: hyper-
parameters, which the next step may change too) whose tensors are this stager's own buffers.

The buffers are allocated on the first save and reused by every later one (the layout of a
run's state never changes): the stall is one memory copy, with no allocation or page faults,
and on CUDA the buffers are pinned, so the device-to-host copy runs at full bandwidth. The
price is one copy of the rank's state (its share: sharded strategies stage only their
shards) held in host memory for the rest of the run; `pretrain.plan` counts it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata
from torch.distributed.tensor import DTensor


def _layout(obj: Any) -> Any:
    """What the buffers for `obj` must look like: every tensor's kind, local shape and dtype,
    by position in the structure."""
    if isinstance(obj, ShardedTensor):
        return ("st", tuple((tuple(s.tensor.shape), s.tensor.dtype) for s in obj.local_shards()))
    if isinstance(obj, DTensor):
        return ("dt", tuple(obj.to_local().shape), obj.dtype, tuple(obj.shape))
    if isinstance(obj, torch.Tensor):
        return ("t", tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return tuple((k, _layout(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return tuple(_layout(v) for v in obj)
    return None


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if type(obj) in (list, tuple):
        return any(_has_tensor(v) for v in obj)
    return False


def _same(t: torch.Tensor) -> Any:
    """What identifies a tensor's elements: its memory (storage, offset, shape, strides) where
    it has plain storage (a DTensor: its local shard's), else the object."""
    if isinstance(t, ShardedTensor):
        return id(t)
    local = t.to_local() if isinstance(t, DTensor) else t
    return (
        local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape),
        local.stride(), local.dtype, local.device,
    )  # fmt: skip


def _empty(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)


def _buffers(obj: Any, pin: bool, memo: dict[int, Any]) -> Any:
    """Host-memory tensors shaped like `obj`'s (no values yet). A tensor that appears twice
    (a tied matrix under both its names, perhaps as two views of one storage) gets one
    buffer (`memo`, by `_same`)."""
    if isinstance(obj, torch.Tensor):
        key = _same(obj)
        if key not in memo:
            memo[key] = _buffer(obj, pin)
        return memo[key]
    if not _has_tensor(obj):
        return None  # deep-copied at each save
    if isinstance(obj, dict):
        return {k: _buffers(v, pin, memo) for k, v in obj.items()}
    return type(obj)(_buffers(v, pin, memo) for v in obj)  # a list or tuple


def _buffer(obj: torch.Tensor, pin: bool) -> torch.Tensor:
    """One host-memory tensor shaped like `obj` (a plain tensor, DTensor or ShardedTensor)."""
    if isinstance(obj, ShardedTensor):
        # Placements name host memory: the staged copy is what DCP writes from.
        def md(m: ShardMetadata) -> ShardMetadata:
            rank = str(m.placement).split("/")[0] if m.placement is not None else "rank:0"
            return ShardMetadata(m.shard_offsets, m.shard_sizes, f"{rank}/cpu")

        meta = obj.metadata()
        shards = [Shard(_empty(s.tensor, pin), md(s.metadata)) for s in obj.local_shards()]
        global_meta = ShardedTensorMetadata(
            [md(m) for m in meta.shards_metadata], meta.size, meta.tensor_properties
        )
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, global_meta)
    if isinstance(obj, DTensor):
        return DTensor.from_local(
            _empty(obj.to_local(), pin),
            device_mesh=obj.device_mesh,
            placements=obj.placements,
            run_check=False,
            shape=obj.shape,
            stride=obj.stride(),
        )
    return _empty(obj, pin)


@torch.no_grad()
def _copy(src: Any, buf: Any, done: set[int]) -> Any:
    """`src`'s values in `buf` (same layout); non-tensor leaves deep-copied. `done`: the
    buffers already written (a tied tensor is copied once)."""
    if isinstance(src, torch.Tensor):
        if id(buf) not in done:
            done.add(id(buf))
            _copy_tensor(src, buf)
        return buf
    if buf is None:
        return copy.deepcopy(src)
    if isinstance(src, dict):
        return {k: _copy(v, buf[k], done) for k, v in src.items()}
    return type(src)(_copy(v, b, done) for v, b in zip(src, buf, strict=True))


def _copy_tensor(src: torch.Tensor, buf: Any) -> None:
    if isinstance(src, ShardedTensor):
        for s, b in zip(src.local_shards(), buf.local_shards(), strict=True):
            b.tensor.copy_(s.tensor)
    elif isinstance(src, DTensor):
        buf.to_local().copy_(src.to_local())
    else:
        buf.copy_(src.detach())


def nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors in a (staged) state dict, this rank's shards only, each tensor
    once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
    if isinstance(obj, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
    if isinstance(obj, DTensor):
        local = obj.to_local()
        return local.numel() * local.element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nbytes(v, seen) for v in obj)
    return 0


class Stager:
    """Stages state dicts into host-memory buffers of its own, reused from save to save."""

    def __init__(self) -> None:
        self._buffers: Any = None
        self._layout: Any = None

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of `state` in this stager's buffers (valid until the next `stage`)."""
        layout = _layout(state)
        if layout != self._layout:
            self._buffers = None  # the old buffers go first: never two sets at once
            self._buffers = _buffers(state, torch.cuda.is_available(), {})
            self._layout = layout
        return _copy(state, self._buffers, set())

    @property
    def nbytes(self) -> int:
        """Host memory the buffers hold."""
        return nbytes(self._buffers)
