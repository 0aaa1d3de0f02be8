"""Checkpoint a tensor of which each rank holds contiguous ranges of its flattened elements.

DeepSpeed partitions parameters as flat ranges (ZeRO-3: each parameter split in equal flat
pieces; ZeRO-1/2: flat ranges of the concatenated parameters of a group), which need not be
whole rows. The checkpoint (torch's DCP) stores every tensor under its full shape, so that any
strategy and world size can read any part of it; DCP describes stored pieces as boxes (an
offset and a size per dimension). `flat_boxes` cuts a flat range into at most 2 * ndim - 1
such boxes, each a contiguous piece of the range (so a view, never a copy), and
`fragment_tensor` presents a rank's ranges to DCP as a ShardedTensor whose local shards are
those views: saving writes each rank's own elements, loading reads into them in place.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)

# DCP still reads and writes ShardedTensor, while warning that DTensor is its successor; a
# DTensor cannot describe a flat range of a matrix that starts mid-row.
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)

Box = tuple[tuple[int, ...], tuple[int, ...], int]  # offsets, sizes, first flat element


def flat_boxes(shape: Sequence[int], start: int, end: int) -> list[Box]:
    """The boxes, in order, covering elements [start, end) of a row-major tensor of `shape`."""
    shape = tuple(shape)
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,), start)] if shape else [((), (), 0)]
    inner = math.prod(shape[1:])  # elements per index of the first dimension
    first, last = start // inner, (end - 1) // inner
    if first == last:  # inside one slice [first, ...]: recurse into it
        sub = flat_boxes(shape[1:], start - first * inner, end - first * inner)
        return [((first, *o), (1, *s), f + first * inner) for o, s, f in sub]
    boxes: list[Box] = []
    head = -(-start // inner) * inner  # the first whole slice
    tail = (end // inner) * inner  # the end of the last whole slice
    if start < head:
        boxes += flat_boxes(shape, start, head)
    if head < tail:
        zeros = (0,) * (len(shape) - 1)
        boxes.append(((head // inner, *zeros), ((tail - head) // inner, *shape[1:]), head))
    if tail < end:
        boxes += flat_boxes(shape, tail, end)
    return boxes


Layout = list[list[tuple[int, int, str]]]  # per rank: (start, numel, device) of each range


def fragment_tensor(
    shape: Sequence[int], pieces: Sequence[tuple[int, torch.Tensor]], layout: Layout
) -> ShardedTensor:
    """A ShardedTensor of `shape` whose local shards are views of this rank's `pieces`
    ((first flat element, 1-D tensor of the range) pairs), given every rank's ranges
    (`layout`, the same on every rank: nothing is communicated here)."""
    rank = torch.distributed.get_rank()
    shards_md, local = [], []
    dtype = next((t.dtype for _, t in pieces), torch.float32)
    for r, ranges in enumerate(layout):
        for start, numel, device in ranges:
            for offsets, sizes, _ in flat_boxes(shape, start, start + numel):
                shards_md.append(ShardMetadata(list(offsets), list(sizes), f"rank:{r}/{device}"))
    for start, flat in pieces:
        for offsets, sizes, first in flat_boxes(shape, start, start + flat.numel()):
            view = own_storage(flat.narrow(0, first - start, math.prod(sizes))).view(sizes)
            md = ShardMetadata(list(offsets), list(sizes), f"rank:{rank}/{flat.device}")
            local.append(Shard(view, md))
    meta = ShardedTensorMetadata(shards_md, torch.Size(shape), TensorProperties(dtype=dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)


def own_storage(view: torch.Tensor) -> torch.Tensor:
    """`view` (contiguous) as a tensor whose storage is exactly its own bytes of the same memory.

    DCP copies a tensor whose storage is larger than itself before writing it (so as not to
    write the whole storage), and keeps every such copy until the rank's file is complete: a
    copy of everything the rank saves. A slice of the storage is the same memory, sized to fit:
    nothing is copied, at save or at load."""
    assert view.is_contiguous()
    size = view.element_size()
    storage = view.untyped_storage()[
        view.storage_offset() * size : (view.storage_offset() + view.numel()) * size
    ]
    out = torch.empty(0, dtype=view.dtype, device=view.device)
    return out.set_(storage, 0, view.shape, view.stride()).detach()


def local_pieces(value: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(offsets, tensor) of the parts of `value` this rank holds: a ShardedTensor's local
    shards, or a plain tensor whole."""
    if isinstance(value, ShardedTensor):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    return [((0,) * value.dim(), value)]
