"""Parallelism lives here, and only here: the model and loop know nothing of it.

`create_engine(cfg, accum)` picks the strategy named by `strategy.name`, sets up the process
group (through Accelerate) and returns an `Engine` whose `build(model_cfg, make_optimizer)`
creates the plain model and applies everything parallelism needs to it, in one order
(`Engine.build`); `setup(model, make_optimizer)` is its last stage, the wrapping itself:

    single, ddp                  replicated model, all-reduced gradients      (ddp.py)
    zero1, zero2, zero3,         DeepSpeed ZeRO via Accelerate's plugin       (zero.py)
    zero3_offload
    fsdp, fsdp_grad_op, hsdp     PyTorch FSDP2 fully_shard                    (fsdp.py)

Where DeepSpeed cannot be used (not installed, fails to import, does not support the precision
on this device, or fails to initialise), a ZeRO strategy runs as its FSDP equivalent and says
so once; `strategy.fallback=error` refuses instead.
"""

from __future__ import annotations

from pretrain import dist
from pretrain.config import STRATEGIES, Config, ConfigError
from pretrain.engine.base import (
    Engine,
    log0,
    lone_process_group_env,
    make_accelerator,
    pick_device,
)
from pretrain.engine.launcher import resolve_strategy

# What a ZeRO strategy becomes without DeepSpeed: same memory model, FSDP2 mechanics.
FSDP_EQUIVALENT = {
    "zero1": ("fsdp_grad_op", "FSDP2 with reshard_after_forward=False"),
    "zero2": ("fsdp_grad_op", "FSDP2 with reshard_after_forward=False"),
    "zero3": ("fsdp", "FSDP2 full shard"),
    "zero3_offload": ("fsdp_offload", "FSDP2 full shard with CPUOffloadPolicy"),
}


class StrategyUnavailable(ConfigError):
    """The requested strategy cannot run here and no fallback is allowed."""


def _fsdp_engine(cfg: Config, accum: int, mode: str, name: str) -> Engine:
    from pretrain.engine.fsdp import MODES, FSDPEngine

    engine = FSDPEngine(cfg, make_accelerator(cfg), accum, **MODES[mode])
    engine.name = name
    return engine


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (and the DeepSpeed switch an Accelerator with
    a DeepSpeed plugin leaves in the environment), so that another Accelerator can be made in
    this process. The torch process group, if any, is kept and reused."""
    import os

    from accelerate.state import AcceleratorState, GradientState

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _zero_engine(cfg: Config, accum: int) -> Engine:
    name = cfg.strategy.name
    if cfg.strategy.fallback not in ("fsdp", "error"):
        raise ConfigError(f"strategy.fallback={cfg.strategy.fallback!r}: use fsdp or error")
    from pretrain.engine.zero import deepspeed_config, unavailable_reason

    # Built (and the user's JSON read) before anything else: a bad config is an error, not a
    # reason to fall back.
    ds = deepspeed_config(cfg, dist.world_size(), accum=accum)
    reason = unavailable_reason(cfg, pick_device(cfg))
    if reason is None:
        try:
            from accelerate.utils import DeepSpeedPlugin

            from pretrain.engine.zero import ZeroEngine

            plugin = DeepSpeedPlugin(hf_ds_config=ds)
            return ZeroEngine(cfg, make_accelerator(cfg, deepspeed_plugin=plugin), accum)
        except Exception as e:  # noqa: BLE001 - any failure to start DeepSpeed
            reason = f"DeepSpeed failed to initialise ({type(e).__name__}: {e})"
            reset_accelerate_state()
    mode, what = FSDP_EQUIVALENT[name]
    if cfg.strategy.fallback == "error":
        raise StrategyUnavailable(
            f"strategy={name} needs DeepSpeed, which cannot be used here: {reason}. Fix the "
            f"DeepSpeed install, or set strategy.fallback=fsdp to run its FSDP equivalent "
            f"({what}) instead"
        )
    log0(
        f"strategy={name}: {reason}; running its FSDP equivalent instead ({what}). "
        "Set strategy.fallback=error to refuse instead."
    )
    return _fsdp_engine(cfg, accum, mode, mode)


def create_engine(cfg: Config, accum: int = 1) -> Engine:
    """The engine for `strategy.name`, for optimizer steps of `accum` micro-batches each.

    `strategy=auto` becomes the strategy the launcher asks for (`launcher.resolve_strategy`:
    it writes the concrete name into `cfg.strategy.name`); `engine.why` says why."""
    why = resolve_strategy(cfg, accum)
    engine = _create(cfg, accum)
    engine.why = why
    return engine


def _create(cfg: Config, accum: int) -> Engine:
    name = cfg.strategy.name
    if name in ("single", "ddp"):
        from pretrain.engine.ddp import DDPEngine

        engine: Engine = DDPEngine(cfg, make_accelerator(cfg), accum)
        engine.name = name
        return engine
    # Sharded strategies need a process group, of one rank in a lone process.
    lone_process_group_env()
    if name in ("fsdp", "fsdp_grad_op", "hsdp"):
        return _fsdp_engine(cfg, accum, name, name)
    return _zero_engine(cfg, accum)


__all__ = ["STRATEGIES", "Engine", "StrategyUnavailable", "create_engine", "reset_accelerate_state"]
