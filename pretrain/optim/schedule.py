"""The learning-rate schedule: a pure function of the step (`lr_at`), so resuming needs only the
step: there is no scheduler object whose state could drift from the checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.config import OptimConfig, ScheduleConfig


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


@dataclass
class Schedule:
    """What an optimizer step needs besides gradients: the learning rate at each step
    (`schedule.*` over `optim.lr` and the run's length) and the gradient-norm clip."""

    peak_lr: float
    max_steps: int
    cfg: ScheduleConfig
    grad_clip: float  # 0 = off

    @classmethod
    def from_config(cls, optim: OptimConfig, cfg: ScheduleConfig, max_steps: int) -> Schedule:
        return cls(optim.lr, max_steps, cfg, optim.grad_clip)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        return lr_at(step, self.max_steps, self.peak_lr, self.cfg)
