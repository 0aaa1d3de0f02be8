"""fsdp, fsdp_grad_op, hsdp (and the FSDP stand-ins of the ZeRO strategies): PyTorch FSDP2.

`torch.distributed.fsdp.fully_shard` is applied here, to every transformer block and then to
the root, on CPU (gloo) and GPU alike. Accelerate's FSDP plugin is not used: on CPU it
silently falls back to plain DDP, which would make "sharded" a word rather than a fact.

Each parameter becomes a DTensor sharded on dim 0 across the shard mesh dimension, so each
rank stores 1/N of the weights, gradients (reduce-scattered in backward) and AdamW state
(built on the local shards). Modes:

    fsdp          full shard: parameters are all-gathered per block for forward, freed,
                  all-gathered again for backward (ZeRO-3 memory).
    fsdp_grad_op  reshard_after_forward=False: the gathered parameters stay between forward and
                  backward (one all-gather per step, more memory); gradients and optimizer
                  state stay sharded (ZeRO-2 memory).
    hsdp          a 2-D mesh (replicate, shard): shard within a node, replicate across nodes
                  (gradients reduce-scattered within after every micro-batch, all-reduced
                  across on the last micro-batch of a step only).
    offload       CPUOffloadPolicy: sharded parameters, gradients and optimizer state live in
                  host memory; the optimizer steps on CPU (the ZeRO-3-offload stand-in).

Mixed precision: MixedPrecisionPolicy(param_dtype=bf16/fp16, reduce_dtype=fp32): the sharded
fp32 parameters are the master weights, compute runs in low precision, gradients are reduced
in fp32. fp16 adds dynamic loss scaling with a scaler whose overflow check is agreed by all
ranks (each rank sees only its shard of the gradients).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, Shard

from pretrain.config import ConfigError
from pretrain.engine.base import OptimizerFactory
from pretrain.engine.matrices import MatrixPieces, MatrixSharding, row_pieces
from pretrain.engine.process_group import ensure_process_group
from pretrain.engine.torch_engine import TorchEngine


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: GPT's `transformer.h`, else every child of
    the model's ModuleLists (a generic transformer layout)."""
    transformer = getattr(model, "transformer", None)
    h = getattr(transformer, "h", None)
    if isinstance(h, nn.ModuleList):
        return list(h)
    return [m for ml in model.modules() if isinstance(ml, nn.ModuleList) for m in ml]


def hsdp_shape(world_size: int, replicas: int, local_world_size: int) -> tuple[int, int]:
    """(replica groups, shard group size) of the HSDP mesh. replicas=0: one replica per node,
    i.e. shard within a node (fast links), replicate across nodes."""
    if replicas <= 0:
        replicas = max(1, world_size // max(1, local_world_size))
    if world_size % replicas:
        raise ConfigError(
            f"strategy.hsdp_replicas={replicas} does not divide the {world_size} processes: "
            "choose a divisor of the world size (0 = one replica per node)"
        )
    return replicas, world_size // replicas


class FSDPEngine(TorchEngine):
    def __init__(
        self,
        cfg: Any,
        accelerator: Any,
        accum: int = 1,
        *,
        reshard_after_forward: bool = True,
        hybrid: bool = False,
        offload: bool = False,
    ) -> None:
        super().__init__(cfg, accelerator, accum)
        self.reshard_after_forward = reshard_after_forward
        self.hybrid = hybrid
        self.offload = offload

    def build_mesh(self) -> DeviceMesh:
        ws = self.world_size
        if not self.hybrid:
            return init_device_mesh(self.device.type, (ws,), mesh_dim_names=("shard",))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ws))
        replicas, shard = hsdp_shape(ws, self.cfg.strategy.hsdp_replicas, local)
        return init_device_mesh(
            self.device.type, (replicas, shard), mesh_dim_names=("replicate", "shard")
        )

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        ensure_process_group(self.cfg)  # a lone process shards over a group of one
        self.adopt(model)
        self.mesh = self.build_mesh()
        meta = any(p.is_meta for p in model.parameters())
        if not self.offload and not meta:
            model.to(self.device)
        low = self.dtype != torch.float32
        mp = MixedPrecisionPolicy(
            param_dtype=self.dtype if low else None,
            reduce_dtype=torch.float32 if low else None,
        )
        offload: OffloadPolicy = (
            CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
            if self.offload
            else OffloadPolicy()
        )
        kwargs: dict[str, Any] = {
            "mesh": self.mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": mp,
            "offload_policy": offload,
        }
        # Blocks first, then the root (embeddings, final norm, tied head): each block's
        # parameters are gathered and freed as one unit.
        for block in blocks_of(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        if meta:
            # Sharded on the meta device, now given storage for this rank's shards only
            # (init_weights fills them).
            model.to_empty(device="cpu" if self.offload else self.device)
        self.model = model
        # After sharding: the optimizer state is allocated on the local shards only.
        self.optimizer = make_optimizer(model)
        # A sharded scaler all-reduces "found inf" so every rank skips (or takes) the same step.
        self.scaler = ShardedGradScaler(
            self.device.type, enabled=self.dtype == torch.float16, process_group=None
        )
        self.share_matrices()

    def matrix_sharding(self) -> MatrixSharding:
        """Every 2-D parameter is a DTensor sharded by rows (Shard(0)) over the mesh's shard
        dimension: rank r of the shard group holds one range of rows (torch.chunk's split; an
        uneven last shard, or none). The rows each rank holds are gathered once, here; under
        hsdp each replica group exchanges within itself (the replicas hold the same shards)."""
        group = self.mesh.get_group("shard")
        rank, size = self.mesh.get_local_rank("shard"), self.mesh.size(self.mesh.ndim - 1)
        named = [
            (name, p)
            for name, p in self.raw_model.named_parameters()
            if p.ndim == 2 and isinstance(p, DTensor)
        ]
        mine: dict[str, tuple[int, int]] = {}
        for name, p in named:
            if Shard(0) not in p.placements:
                raise ConfigError(f"{name}: FSDP sharded it {p.placements}, not by rows (Shard(0))")
            rows = int(p.to_local().shape[0])
            first = int(p.__create_chunk_list__()[0].offsets[0]) if rows else 0
            mine[name] = (first, rows)
        every: list[Any] = [None] * size
        dist.all_gather_object(every, mine, group=group)
        pieces = {id(p): [row_pieces(name, p.shape, [e[name] for e in every])] for name, p in named}

        def matrices(held: torch.Tensor) -> list[MatrixPieces]:
            return pieces[id(held)]

        return MatrixSharding(rank, size, matrices, group, self.device)

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        # No autocast: FSDP casts the parameters to param_dtype itself. Gradients are
        # reduce-scattered after every micro-batch and accumulate sharded, so memory stays 1/N
        # during accumulation. hsdp all-reduces them across replicas (the slow, inter-node
        # links) once per step, on the last micro-batch; until then the replica's partial sum
        # accumulates in the shard.
        if self.hybrid:
            self.model.set_requires_all_reduce(last)  # type: ignore[operator]
        _, loss = self.model(x, y)
        self.scaler.scale(loss / self.accum).backward()
        return loss.detach().float()

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        _, loss = self.model(x, y)
        self.model.train()
        return loss.detach().float()
