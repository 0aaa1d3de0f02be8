"""Where the pieces of each weight matrix live, for an optimizer that needs whole matrices.

Muon orthogonalises each matrix's update as a whole (Newton-Schulz), but a sharded strategy
gives the optimizer only this rank's elements: FSDP a DTensor's rows, ZeRO flat fp32 partitions
that cut matrices anywhere (`deepspeed_state.Fragment`). A `MatrixSharding`, supplied by the
engine, says which matrices each tensor the optimizer holds covers, which flat range of each
matrix every rank holds, and runs the one collective such an optimizer needs (an all-to-all),
so the optimizer never asks which strategy it runs under. Strategies whose optimizer holds
whole matrices (single, ddp) supply none.

What a rank holds of a matrix is one contiguous range of its flattened (row-major) elements,
possibly empty: FSDP's Shard(0) rows are one range, and so is a ZeRO fragment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MatrixPieces:
    """One matrix as the ranks of the sharding group hold it."""

    name: str  # the parameter's name (the same on every rank)
    shape: tuple[int, int]  # the full matrix's shape
    starts: tuple[int, ...]  # per rank: first flat element it holds
    numels: tuple[int, ...]  # per rank: how many (0: none)
    offset: int  # where this rank's range starts in the (flattened) local tensor that holds it


class MatrixSharding:
    """The matrices behind each tensor an optimizer holds, and the collective to exchange their
    pieces. `matrices(held)` is the same list, in the same order, on every rank of the group,
    for the same `held` position in the optimizer (offsets aside), so that ranks that walk their
    param groups in order call the collective with matching plans."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        by_tensor: Callable[[torch.Tensor], list[MatrixPieces]],
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self._by_tensor = by_tensor
        self.group = group
        # Where the collective runs (NCCL: the GPU), whatever device the optimizer's tensors are
        # on (host memory under offload).
        self.device = device

    def matrices(self, held: torch.Tensor) -> list[MatrixPieces]:
        """The matrices whose pieces `held` (a parameter, DTensor or flat partition) holds."""
        return self._by_tensor(held)

    def all_to_all(
        self, send: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]
    ) -> torch.Tensor:
        """1-D `send` cut into `send_splits` (one per rank, in rank order) goes to those ranks;
        returns what every rank sent here, concatenated in rank order (`recv_splits`)."""
        home = send.device
        wire = self.device if self.device is not None else home
        recv = torch.empty(sum(recv_splits), dtype=send.dtype, device=wire)
        if self.world_size == 1:
            recv.copy_(send)
        else:
            dist.all_to_all_single(
                recv, send.to(wire).contiguous(), list(recv_splits), list(send_splits),
                group=self.group,
            )  # fmt: skip
        return recv.to(home)


def row_pieces(
    name: str, shape: Sequence[int], rows_per_rank: Sequence[tuple[int, int]]
) -> MatrixPieces:
    """A matrix sharded by rows: rank r holds rows [first, first + count) (FSDP's Shard(0))."""
    rows, cols = int(shape[0]), int(shape[1])
    assert sum(n for _, n in rows_per_rank) == rows, (name, shape, rows_per_rank)
    return MatrixPieces(
        name,
        (rows, cols),
        tuple(first * cols for first, _ in rows_per_rank),
        tuple(count * cols for _, count in rows_per_rank),
        0,
    )
