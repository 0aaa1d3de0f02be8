"""The optimizer, its parameter groups, and the learning-rate schedule.

    adamw.py     AdamW with an optional decoupled L1 penalty (`AdamWL1`), its two groups
    muon.py      Muon for the block matrices + AdamW for the rest (`MuonAdamW`), sharding-aware
    schedule.py  the learning rate as a pure function of the step (`lr_at`, `Schedule`)

`build_optimizer` picks one by `optim.name`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.config import OptimConfig, OptimizerName
from pretrain.optim.adamw import AdamWL1, param_groups, soft_threshold
from pretrain.optim.muon import MuonAdamW, muon_param_groups
from pretrain.optim.schedule import Schedule, lr_at


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> AdamWL1:
    """The optimizer `optim.name` names over `model`'s parameters (AdamWL1 or MuonAdamW)."""
    fused: bool | None
    if cfg.fused == "auto":
        fused = device.type == "cuda" or None
    else:
        fused = cfg.fused.lower() == "true"
    adamw: dict[str, Any] = {
        "lr": cfg.lr,
        "betas": (cfg.beta1, cfg.beta2),
        "eps": cfg.eps,
        "fused": fused,
    }
    if OptimizerName(cfg.name) == OptimizerName.muon:
        return MuonAdamW(muon_param_groups(model, cfg), l1=cfg.l1, **adamw)
    return AdamWL1(param_groups(model, cfg.weight_decay, cfg.l1), **adamw)


__all__ = [
    "AdamWL1",
    "MuonAdamW",
    "Schedule",
    "build_optimizer",
    "lr_at",
    "muon_param_groups",
    "param_groups",
    "soft_threshold",
]
