"""Tokens per second and model FLOPs utilisation between logging steps.

Validation and saving are left out of the clock (`Throughput.paused`), so the figures are
training's own. MFU = achieved model FLOP/s over the peak of every device in the job
(`pretrain/flops.py` has the FLOPs per token and the peak table; `logging.peak_flops` overrides
the peak).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from pretrain.engine import Engine
from pretrain.flops import peak_flops
from pretrain.metrics import memory_bytes


class Throughput:
    """Loss and tokens/s between logging steps, with validation and saving left out."""

    def __init__(self, engine: Engine, tokens_per_step: int, flops_per_token: float) -> None:
        self.engine, self.tokens_per_step, self.fpt = engine, tokens_per_step, flops_per_token
        device = engine.device
        self.peak = engine.cfg.logging.peak_flops or peak_flops(
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            engine.cfg.precision.dtype,
        )
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        """One optimizer step's mean loss (a 0-dim tensor; no host sync)."""
        self.loss_sum += loss
        self.steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t

    def flush(self, **step_values: Any) -> dict[str, Any]:
        """Collective (the mean loss over ranks): the metrics since the last flush, in the
        order they are logged: the loss, then `step_values` (the step's lr, gradient norm),
        then the rates; `tokens_seen` last."""
        elapsed = time.perf_counter() - self.t0
        tps = self.steps * self.tokens_per_step / elapsed
        tokens_seen = step_values.pop("tokens_seen", None)
        out = {
            "loss": float(self.engine.all_reduce_mean(self.loss_sum / self.steps).item()),
            **{k: float(v.item()) if torch.is_tensor(v) else v for k, v in step_values.items()},
            "tokens_per_s": tps,
            "mfu": tps * self.fpt / (self.peak * self.engine.world_size) if self.peak else None,
            "step_time_s": elapsed / self.steps,
            "mem_gb": memory_bytes(self.engine.device) / 1e9,
            "tokens_seen": tokens_seen,
        }
        self.loss_sum.zero_()
        self.steps, self.t0 = 0, time.perf_counter()
        return out
