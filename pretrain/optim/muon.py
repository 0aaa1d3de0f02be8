"""Muon for the hidden matrices, AdamW for everything else, in one torch optimizer.

Muon (Keller Jordan; `torch.optim.Muon`) keeps one momentum buffer per matrix and steps along
its orthogonalised direction: for a matrix W [A, B] with gradient G,

    M <- mu * M + (1 - mu) * G                   (buf.lerp_(G, 1 - mu))
    U  = (1 - mu) * G + mu * M  if nesterov else M
    O  = NS(U)                                   (5 quintic Newton-Schulz steps, in bf16: ~U V^T)
    W <- W * (1 - lr * wd) - adjusted(lr) * O

with `adjusted` one of torch's rules: "original" lr * sqrt(max(1, A / B)) (Keller Jordan's; its
lr is ~0.02), or "match_rms_adamw" 0.2 * lr * sqrt(max(A, B)) (Moonlight: the update has the
RMS of an AdamW update, so AdamW's lr and weight decay carry over). The math here is torch's,
operation for operation, so one process gives torch.optim.Muon's results bit for bit
(tests/unit/test_muon.py).

Which parameters: the 2-D weights inside the transformer blocks (attention and MLP matrices).
Embeddings, the output layer (a tied embedding), norms, biases and position tables stay with
AdamW (`muon_param_groups`): Muon is defined for hidden layers, and an embedding's rows are
looked up one at a time, not multiplied as a whole.

Sharded strategies hold only pieces of each matrix, but NS needs it whole. The engine supplies a
`MatrixSharding` (pretrain/engine/matrices.py: which flat range of which matrix every rank holds,
and an all-to-all); `orthogonalize_pieces` then sends each matrix's pieces of U to one owner
rank (owners balanced across ranks by NS cost), the owner orthogonalises the whole matrix, and
sends each rank its own range of O back (in NS's dtype): two all-to-alls per step, each rank
receiving about (N - 1) / N^2 of the Muon elements each way, and NS run once per matrix.
Everything else (momentum, decay, the update) is elementwise on the local pieces, so the result
is the single-process one under every strategy (within reduction-order noise).

Why owners rather than every rank gathering every matrix (an all-gather, then NS everywhere):
the same bytes at 2 ranks, N/2 times fewer beyond, and NS computed once instead of N times.
Replicated strategies (single, ddp) hold every matrix whole and orthogonalise it locally.

NS runs in bf16 as torch's does (`optim.muon_ns_dtype=fp32` on CPUs without bf16 matmuls,
where bf16 is emulated and 10-50x slower than fp32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pretrain.config import ConfigError, MuonAdjustLR, MuonNSDtype, OptimConfig
from pretrain.optim.adamw import AdamWL1, _local, param_groups, soft_threshold

if TYPE_CHECKING:
    from pretrain.engine.matrices import MatrixPieces, MatrixSharding

# torch.optim.Muon's defaults (Keller Jordan's constants).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def zeropower_via_newtonschulz(
    update: torch.Tensor,
    coefficients: Sequence[float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """~U V^T of update [A, B] = U S V^T, in `dtype` (bf16: torch.optim.Muon's, operation for
    operation): scaled to spectral norm <= 1 by its Frobenius norm, then `steps` quintic
    iterations X <- a X + (b X X^T + c (X X^T)^2) X on the wide orientation (A <= B, so the Gram
    matrix X X^T is the small one)."""
    a, b, c = coefficients
    x = update.to(dtype, copy=True)  # never the caller's tensor (a momentum buffer) itself
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, rule: str, shape: Sequence[int]) -> float:
    """The learning rate Muon applies to a matrix of `shape` [A, B] (torch's `_adjust_lr`)."""
    rows, cols = shape[0], shape[1]
    if rule == MuonAdjustLR.match_rms_adamw.value:
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (`transformer.h.<i>.`): Muon's."""
    return p.ndim == 2 and name.startswith("transformer.h.")


def muon_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Three groups: Muon (the block matrices), AdamW with weight decay (embeddings, an untied
    output layer), AdamW without (biases, norms, positions: see `param_groups`). Every group
    has `kind` ("muon"/"adamw") and `lr_scale`: its peak lr over `optim.lr`, so that the
    schedule (which sets one lr for all groups) scales each group's own peak. L1 applies to
    the decayed matrices of both kinds."""
    if cfg.muon_lr is not None and cfg.muon_lr < 0:
        raise ConfigError(f"optim.muon_lr={cfg.muon_lr} must be positive (null = optim.lr)")
    if cfg.muon_lr is not None and cfg.lr <= 0:
        raise ConfigError(
            f"optim.muon_lr={cfg.muon_lr} needs optim.lr > 0: the schedule scales both groups "
            "by optim.lr"
        )
    if not 0.0 <= cfg.muon_momentum < 1.0:
        raise ConfigError(f"optim.muon_momentum={cfg.muon_momentum} must be in [0, 1)")
    if cfg.muon_ns_steps < 1 or cfg.muon_ns_steps >= 100:
        raise ConfigError(f"optim.muon_ns_steps={cfg.muon_ns_steps} must be in [1, 99]")
    weight_decay = cfg.weight_decay if cfg.muon_weight_decay is None else cfg.muon_weight_decay
    if weight_decay < 0:
        raise ConfigError(f"optim.muon_weight_decay={weight_decay} must be 0 (off) or positive")
    hidden = {id(p) for n, p in model.named_parameters() if is_hidden_matrix(n, p)}
    decay, no_decay = param_groups(model, cfg.weight_decay, cfg.l1)
    muon = {
        "params": [p for p in decay["params"] if id(p) in hidden],
        "kind": "muon",
        "lr_scale": 1.0 if cfg.muon_lr is None else cfg.muon_lr / cfg.lr,
        "weight_decay": weight_decay,
        "l1": cfg.l1,
        "momentum": cfg.muon_momentum,
        "nesterov": cfg.muon_nesterov,
        "ns_steps": cfg.muon_ns_steps,
        "ns_coefficients": NS_COEFFICIENTS,
        "ns_eps": NS_EPS,
        "adjust_lr": MuonAdjustLR(cfg.muon_adjust_lr).value,
        "ns_dtype": MuonNSDtype(cfg.muon_ns_dtype).value,
    }
    if not muon["params"]:
        raise ConfigError(
            "optim=muon found no matrices inside the transformer blocks (transformer.h.*) to "
            "step: use optim=adamw for this model"
        )
    decay["params"] = [p for p in decay["params"] if id(p) not in hidden]
    return [
        muon,
        {**decay, "kind": "adamw", "lr_scale": 1.0},
        {**no_decay, "kind": "adamw", "lr_scale": 1.0},
    ]


def assign_owners(matrices: Sequence[MatrixPieces], world_size: int) -> list[int]:
    """The rank that orthogonalises each matrix: a rank holding it whole (nothing to send), else
    the least loaded rank so far, largest NS cost (A * B * min(A, B)) first. Deterministic: every
    rank computes the same owners from the same plan."""
    owners = [-1] * len(matrices)
    load = [0] * world_size

    def cost(m: MatrixPieces) -> int:
        return m.shape[0] * m.shape[1] * min(m.shape)

    for k, m in enumerate(matrices):
        whole = [r for r, n in enumerate(m.numels) if n == m.shape[0] * m.shape[1]]
        if whole:
            owners[k] = whole[0]
            load[whole[0]] += cost(m)
    rest = sorted(
        (k for k in range(len(matrices)) if owners[k] < 0), key=lambda k: -cost(matrices[k])
    )
    for k in rest:
        owners[k] = min(range(world_size), key=lambda r: (load[r], r))
        load[owners[k]] += cost(matrices[k])
    return owners


def orthogonalize_pieces(
    sharding: MatrixSharding,
    matrices: Sequence[MatrixPieces],
    mine: Sequence[torch.Tensor],
    orthogonalize: Callable[[torch.Tensor], torch.Tensor],
    result_dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """This rank's range of `orthogonalize(U)` for every matrix U, given this rank's range of
    each (`mine[k]`: 1-D, `matrices[k].numels[rank]` elements). Collective over the sharding's
    group: every rank passes the same `matrices`, in the same order.

    1. all-to-all: every piece goes to its matrix's owner (`assign_owners`);
    2. each owner assembles its matrices [A, B] whole, in fp32, and orthogonalises them;
    3. all-to-all back: every rank gets its own range of each result (in `result_dtype`,
       `orthogonalize`'s: every rank must know it, owner or not)."""
    world, rank = sharding.world_size, sharding.rank
    owners = assign_owners(matrices, world)
    owned = [k for k, o in enumerate(owners) if o == rank]
    device = mine[0].device if mine else torch.device("cpu")
    dtype = mine[0].dtype if mine else torch.float32

    def cat(parts: list[torch.Tensor], like: torch.dtype) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty(0, dtype=like, device=device)

    # 1. Pieces to owners, grouped by destination rank, matrices in plan order.
    send = cat([mine[k] for dest in range(world) for k, o in enumerate(owners) if o == dest], dtype)
    send_splits = [
        sum(m.numels[rank] for m, o in zip(matrices, owners) if o == dest) for dest in range(world)
    ]
    recv_splits = [sum(matrices[k].numels[src] for k in owned) for src in range(world)]
    recv = sharding.all_to_all(send, send_splits, recv_splits)

    # 2. Assemble and orthogonalise each owned matrix.
    full = {k: torch.empty(math.prod(matrices[k].shape), dtype=dtype, device=device) for k in owned}
    pos = 0
    for src in range(world):
        for k in owned:
            m = matrices[k]
            n = m.numels[src]
            full[k].narrow(0, m.starts[src], n).copy_(recv.narrow(0, pos, n))
            pos += n
    done = {k: orthogonalize(full[k].view(matrices[k].shape)).contiguous().view(-1) for k in owned}

    # 3. Each rank's ranges back, grouped by destination, owned matrices in plan order.
    back = cat(
        [
            done[k].narrow(0, matrices[k].starts[dest], matrices[k].numels[dest])
            for dest in range(world)
            for k in owned
        ],
        result_dtype,
    )
    back_splits = [sum(matrices[k].numels[dest] for k in owned) for dest in range(world)]
    from_owners = [
        sum(m.numels[rank] for m, o in zip(matrices, owners) if o == src) for src in range(world)
    ]
    got = sharding.all_to_all(back.to(result_dtype), back_splits, from_owners)
    result: list[torch.Tensor] = [got[:0]] * len(matrices)
    pos = 0
    for src in range(world):
        for k, o in enumerate(owners):
            if o == src:
                n = matrices[k].numels[rank]
                result[k] = got.narrow(0, pos, n)
                pos += n
    return result


class MuonAdamW(AdamWL1):
    """Muon on the groups with kind "muon", AdamW (with its L1 step, `AdamWL1`) on the others.

    One optimizer, so that every strategy wraps, shards and checkpoints it as it does AdamW: the
    state of a Muon parameter is {"step", "momentum_buffer"} (the buffer has the parameter's
    shape and sharding), of an AdamW one {"step", "exp_avg", "exp_avg_sq"}. Each group's lr is
    `lr * lr_scale` (the engine sets `lr` from the schedule). A strategy whose optimizer holds
    pieces of matrices (DTensor shards, ZeRO's flat partitions) must call
    `set_matrix_sharding` before the first step; without it, a Muon parameter must be a whole
    2-D matrix, and anything else is refused."""

    def __init__(self, params: Iterable[Any], *, l1: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, l1=l1, **kwargs)
        # GradScaler must skip a whole step on overflow, not hand a fused AdamW the scale: the
        # Muon half has no fused kernel that would honour it.
        self._step_supports_amp_scaling = False
        self.sharding: MatrixSharding | None = None

    def set_matrix_sharding(self, sharding: MatrixSharding | None) -> None:
        """Where the pieces of each Muon matrix live (None: every parameter is whole here)."""
        self.sharding = sharding

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        adamw = [g for g in groups if g.get("kind") != "muon"]
        if adamw:
            # AdamW's own step over its groups only (ZeRO steps one group at a time the same way).
            self.param_groups = adamw
            try:
                torch.optim.AdamW.step(self)
            finally:
                self.param_groups = groups
        for group in groups:
            if group.get("kind") == "muon":
                self._muon_step(group)
        soft_threshold(groups, None)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        if not group["params"]:  # ZeRO-3 steps one sub-group at a time; the others are empty
            return
        lr = group["lr"] * group["lr_scale"]
        momentum, rule = group["momentum"], group["adjust_lr"]
        dtype = NS_DTYPES[group.get("ns_dtype", "bf16")]

        def ns(u: torch.Tensor) -> torch.Tensor:
            coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["ns_eps"]
            return zeropower_via_newtonschulz(u, coefficients, steps, eps, dtype)

        # held: the tensors this rank steps (whole matrices, DTensor shards or ZeRO's flat
        # partitions); updates: U for each, the local elements in the held tensor's shape.
        held, updates = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.lerp_(grad, 1 - momentum)
            held.append(p)
            updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
        if self.sharding is None:
            for p, update in zip(held, updates):
                if p.ndim != 2 or _local(p) is not p:
                    raise RuntimeError(
                        f"Muon got a piece of a matrix (shape {tuple(p.shape)}, "
                        f"{type(p).__name__}) but no MatrixSharding: the engine must call "
                        "set_matrix_sharding for a sharded strategy"
                    )
                orthogonal = ns(update)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(orthogonal, alpha=-adjusted_lr(lr, rule, p.shape))
            return
        # Every matrix behind every held tensor, in the same order on every rank; this rank's
        # range of U of each (1-D views), orthogonalised whole by its owner and returned.
        rank = self.sharding.rank
        plan = [(i, m) for i, p in enumerate(held) for m in self.sharding.matrices(p)]
        mine = [updates[i].reshape(-1).narrow(0, m.offset, m.numels[rank]) for i, m in plan]
        pieces = orthogonalize_pieces(self.sharding, [m for _, m in plan], mine, ns, dtype)
        for p in held:
            _local(p).mul_(1 - lr * group["weight_decay"])
        for (i, m), orthogonal in zip(plan, pieces):
            w = _local(held[i]).view(-1).narrow(0, m.offset, m.numels[rank])
            w.add_(orthogonal, alpha=-adjusted_lr(lr, rule, m.shape))
