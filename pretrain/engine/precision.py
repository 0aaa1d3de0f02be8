"""Numeric precision: the one table of dtypes by name, autocast, and the loss scaler's state.

`precision.dtype` (and the export and evaluation tools' `dtype` choices) name a dtype as fp32,
bf16 or fp16: `DTYPES` is the one table of those names. `autocast` is how every strategy (and
anything else that runs the model) computes in a 16-bit dtype over fp32 weights. fp16 also
needs loss scaling: `scaler_state` is the scaler's state in the one form every strategy saves.

Only torch is imported here (no Accelerate, no DeepSpeed): tools that run or convert a model
outside training use this module too.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(
    device: str | torch.device, dtype: str | torch.dtype
) -> contextlib.AbstractContextManager:
    """Compute in `dtype` (a torch dtype or a `DTYPES` name) on `device` (a torch device or its
    type, e.g. "cuda"): torch.autocast, or nothing at all for fp32."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else device
    return torch.autocast(device_type=device_type, dtype=dtype)


def scaler_state(scale: float, growth_tracker: int) -> dict[str, torch.Tensor]:
    """The loss scaler's state in the one form every strategy saves (fp16 only)."""
    return {
        "scale": torch.tensor(float(scale), dtype=torch.float64),
        "growth_tracker": torch.tensor(int(growth_tracker), dtype=torch.int64),
    }


def scaler_state_of(scaler: torch.amp.GradScaler) -> dict[str, torch.Tensor]:
    """`scaler_state` of a torch GradScaler (or ShardedGradScaler)."""
    return scaler_state(scaler.get_scale(), scaler._get_growth_tracker())


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `scaler_state_of`: set `scaler`'s scale and growth tracker from `state`."""
    sd = scaler.state_dict()
    sd["scale"] = float(state["scale"].item())
    sd["_growth_tracker"] = int(state["growth_tracker"].item())
    scaler.load_state_dict(sd)
