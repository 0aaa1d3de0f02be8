"""Optimizer parameter groups and the learning-rate schedule.

The schedule is a pure function of the step (`lr_at`), so resuming needs only the step:
there is no scheduler object whose state could drift from the checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matmul weights (decayed) and everything else (not decayed).

    Decay pulls weights toward zero; that regularises the matrices of linear layers and the
    (tied) token embedding, which is the output projection too. Biases, norm gains and
    learned position embeddings carry offsets and scales where a pull toward zero only hurts.
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
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused: bool | None
    if cfg.fused == "auto":
        fused = device.type == "cuda" or None
    else:
        fused = cfg.fused.lower() == "true"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )


def lr_at(step: int, max_steps: int, peak: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    min_lr = peak * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        # (step + 1): the very first update already moves, as in nanoGPT.
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return peak
    if cfg.name == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - min_lr)
    if cfg.name == "wsd":
        decay_steps = max(1, int(cfg.decay_fraction * max_steps))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / decay_steps)
        return peak - progress * (peak - min_lr)
    raise ValueError(f"unknown schedule.name={cfg.name!r}: use cosine, wsd or constant")
