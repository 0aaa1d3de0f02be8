"""AdamW with an optional decoupled L1 penalty, and its parameter groups."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, l1: float = 0.0) -> list[dict]:
    """Two groups: matmul weights (decayed, and L1-penalised) and everything else (neither).

    Decay pulls weights toward zero; that regularises the matrices of linear layers and the
    (tied) token embedding, which is the output projection too. Biases, norm gains and
    learned position embeddings carry offsets and scales where a pull toward zero only hurts.
    The L1 penalty is a pull toward zero too, so it applies to the same group.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied weight appears under two names; optimise it once
        if p.ndim >= 2 and "wpe" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "l1": l1},
        {"params": no_decay, "weight_decay": 0.0, "l1": 0.0},
    ]


def _local(p: torch.Tensor) -> torch.Tensor:
    """The elements of `p` this rank holds: a DTensor's local shard (under no_grad, `to_local`
    returns the shard itself, so writing to it writes the parameter), else `p`."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


@torch.no_grad()
def soft_threshold(groups: Iterable[dict[str, Any]], found_inf: torch.Tensor | None) -> None:
    """The decoupled L1 step of every group with `l1` > 0 (see `AdamWL1`): each parameter with
    a gradient is soft-thresholded by the group's learning rate (times its `lr_scale`, where it
    has one) times `l1`. `found_inf` (a GradScaler's, around fused steps): where it is set the
    update was skipped, and so is the shrinkage."""
    for group in groups:
        if group.get("l1", 0.0) <= 0:
            continue
        threshold = group["lr"] * group.get("lr_scale", 1.0) * group["l1"]
        if found_inf is not None:
            threshold = threshold * (found_inf == 0)  # 0 where the update was skipped
        for p in group["params"]:
            if p.grad is None:
                continue
            w = _local(p)
            w.sub_(w.clamp(-threshold, threshold))


class AdamWL1(torch.optim.AdamW):
    """AdamW, then a decoupled L1 step on every group with `l1` > 0: each parameter is
    soft-thresholded by the step's learning rate times `l1`,

        w <- sign(w) * max(|w| - lr * l1, 0)   ( = w - clamp(w, -lr * l1, lr * l1) ),

    the proximal operator of the penalty `l1 * ||w||_1` for a step of size lr. So a step is a
    proximal-gradient step on `loss + l1 * ||w||_1` in which the gradient step is AdamW's: with
    plain SGD in place of Adam it would be exactly proximal SGD (ISTA) on that objective. Like
    AdamW's decoupled weight decay (the L2 counterpart: `w <- w - lr * wd * w`), the shrinkage
    is not rescaled by Adam's per-element statistics, so every weight is pulled toward zero at
    the same rate, and weights whose updates cannot outrun the pull become exactly zero (which
    a subgradient `l1 * sign(w)` added to the gradient never achieves).

    The step is elementwise on the tensors the optimizer holds, so it needs no communication
    and runs unchanged on every strategy: replicated parameters (single, DDP: every rank does
    the same arithmetic), DTensor shards (FSDP), DeepSpeed's flat fp32 partitions (ZeRO, whose
    padding is zero and stays zero). A parameter without a gradient is skipped, as AdamW skips
    it. With a GradScaler on a fused step (`found_inf` set), a skipped update skips the
    shrinkage too.
    """

    def __init__(self, params: Iterable[Any], *, l1: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.defaults["l1"] = l1
        for group in self.param_groups:
            group.setdefault("l1", l1)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        loss = super().step(closure)
        soft_threshold(self.param_groups, getattr(self, "found_inf", None))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the moments and step counts; keep this optimizer's configured hyperparameters
        (weight decay, l1, betas, eps, ...) instead of the saved ones, so that a resumed run
        uses what its config says (as under ZeRO, which loads moments only), and a checkpoint
        written before a hyperparameter existed still loads. `lr` is set every step anyway."""
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, hyper in zip(self.param_groups, configured):
            group.update(hyper)
