"""The default torch paths of an engine: plain (single, ddp) and FSDP2 models with a torch
optimizer and a GradScaler.

`TorchEngine` implements what `Engine` leaves to a strategy with torch's own APIs: full weights
copied into whole parameters or DTensor shards, the optimizer step with clipping and fp16 loss
scaling, the state dict through `torch.distributed.checkpoint.state_dict` (which covers plain,
DDP and FSDP2 modules alike), evaluation under autocast, and the memory held. DDPEngine and
FSDPEngine build on it; ZeroEngine (DeepSpeed) has its own ways for all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from pretrain.engine.base import Engine
from pretrain.engine.measure import storage_bytes
from pretrain.engine.precision import load_scaler_state, scaler_state_of


class TorchEngine(Engine):
    """An engine whose model is a torch module (plain, DDP or FSDP2) stepped by a torch
    optimizer with `self.scaler` (a GradScaler, enabled for fp16 only)."""

    @torch.no_grad()
    def _load_full(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors, one (name, value) at a time, into this rank's part of each
        parameter. Parameters are whole (single, ddp) or DTensors (FSDP)."""
        params = dict(self.raw_model.named_parameters())
        for name, full in items:
            p = params[name]
            if isinstance(p, DTensor):
                # This rank's shard of `full`: the box DCP would save it as (no communication,
                # every rank has `full`).
                (chunk,) = p.__create_chunk_list__()
                box = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))
                p.to_local().copy_(full[box])
            else:
                p.copy_(full)

    def optimizer_step(self, lr: float, max_norm: float) -> torch.Tensor:
        """Set the learning rate, clip (max_norm > 0), step and zero the gradients.
        Returns the global gradient norm before clipping (a 0-dim tensor)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        # With DTensor (FSDP) gradients this is the norm of the full gradient (a collective).
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), max_norm if max_norm > 0 else float("inf")
        )
        full = getattr(norm, "full_tensor", None)
        norm = full() if callable(full) else norm
        # With fp16, step() is skipped when gradients overflowed; update() adapts the scale.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def state_dict(self) -> dict[str, Any]:
        """{"model": ..., "optim": ...} keyed by parameter names (DCP-ready; may hold DTensors).

        torch's state-dict API covers plain, DDP and FSDP2 modules alike: names come without
        wrapper prefixes, and DTensor shards are written once and resharded by DCP on load."""
        state: dict[str, Any] = {
            "model": self.model_state_dict(),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
        }
        if getattr(self, "scaler", None) is not None and self.scaler.is_enabled():
            state["scaler"] = scaler_state_of(self.scaler)
        return state

    def model_state_dict(self) -> dict[str, Any]:
        """The "model" part of `state_dict()` alone: this rank's part of the fp32 weights, by
        parameter name (no optimizer state is created for it)."""
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`; `state` has the structure `state_dict()` returned."""
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        scaler = getattr(self, "scaler", None)
        if "scaler" in state and scaler is not None and scaler.is_enabled():
            load_scaler_state(scaler, state["scaler"])

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with self.autocast():
            _, loss = self.model(x, y)
        self.model.train()
        return loss.detach().float()

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds right now, measured from the live tensors (not formulas):
        params (the model's parameters, local shards only), grads, optim (optimizer state
        such as exp_avg/exp_avg_sq), master and master_grads (separate fp32 master weights and
        their gradients, if the strategy keeps any: DeepSpeed does).
        Call it between the last micro_step and optimizer_step to see gradients."""
        params = list(self.raw_model.parameters())
        states = [
            v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ]
        return {
            "params": storage_bytes(params),
            "grads": storage_bytes(p.grad for p in params),
            "optim": storage_bytes(v for v in states if v.dim() > 0),
            "master": 0,
            "master_grads": 0,
        }
