"""single and ddp: the model replicated on every rank, gradients all-reduced (Accelerate's DDP).

Mixed precision is ours rather than Accelerate's: Accelerate ignores fp16 on CPU, and one
autocast + GradScaler path keeps every device and strategy numerically the same.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pretrain.config import ConfigError
from pretrain.engine.base import OptimizerFactory
from pretrain.engine.torch_engine import TorchEngine


class DDPEngine(TorchEngine):
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.adopt(model)
        if self.world_size > 1 and self.name == "single":
            raise ConfigError(
                f"strategy=single runs one process, but {self.world_size} were launched: "
                "use strategy=ddp (or a sharded strategy) for multi-process runs"
            )
        # Replicated: every rank holds the whole model. From the meta device it gets storage
        # here and its values in init_weights (DDP's first broadcast then copies garbage, which
        # every rank overwrites with the same initial values).
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=self.device)
        model = model.to(self.device)
        optimizer = make_optimizer(model)
        # prepare() wraps in DistributedDataParallel when there are several processes.
        self.model, wrapped_opt = self.accelerator.prepare(model, optimizer)
        self.optimizer = wrapped_opt.optimizer
        # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        sync = last or self.world_size == 1
        # Skip the gradient all-reduce on all but the last micro-batch of a step.
        ctx = contextlib.nullcontext() if sync else self.model.no_sync()  # type: ignore[operator]
        with ctx:
            with self.autocast():
                _, loss = self.model(x, y)
            self.scaler.scale(loss / self.accum).backward()
        return loss.detach().float()
