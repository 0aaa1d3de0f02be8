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

The package's modules, one concern each:

    base.py             the `Engine` interface and the one order in which a model is built
    torch_engine.py     the default torch paths (single, ddp, fsdp*): weights, the step with
                        a GradScaler, the state dict, evaluation, memory
    strategies.py       facts about the strategies (their code: ddp.py, zero.py, fsdp.py):
                        ZeRO stages, FSDP modes, fallbacks, DeepSpeed's bucket size
    launcher.py         the strategy a launcher (accelerate launch, torchrun) asks for
    process_group.py    the process group's life: device, environment, start, reset, teardown
    precision.py        dtypes by name, autocast, the loss scaler's state
    hostmem.py          host memory given back to the OS
    measure.py          the bytes a rank's tensors hold
    deepspeed_state.py  the one adapter over DeepSpeed's internals
    fragments.py        DeepSpeed's flat partitions as sharded tensors for the checkpoint
    matrices.py         which rank holds which piece of each matrix, for an optimizer that
                        needs whole matrices (Muon), and the all-to-all it exchanges them with

Importing the package (say, for `precision` or `strategies`) loads neither Accelerate nor
DeepSpeed nor the strategies: `create_engine` imports the one it builds, and `Engine` is
imported from base.py when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pretrain import dist
from pretrain.config import Config, ConfigError
from pretrain.engine import process_group, strategies
from pretrain.engine.launcher import resolve_strategy

if TYPE_CHECKING:
    from pretrain.engine.base import Engine


def __getattr__(name: str) -> Any:
    # `Engine` on first use: base.py loads torch's distributed checkpointing (about a second),
    # which a tool that imports only precision or strategies does not need.
    if name == "Engine":
        from pretrain.engine.base import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StrategyUnavailable(ConfigError):
    """The requested strategy cannot run here and no fallback is allowed."""


def _fsdp_engine(cfg: Config, accum: int, mode: str, name: str) -> Engine:
    from pretrain.engine.fsdp import FSDPEngine

    engine = FSDPEngine(cfg, process_group.make_accelerator(cfg), accum, **strategies.MODES[mode])
    engine.name = name
    return engine


def _zero_engine(cfg: Config, accum: int) -> Engine:
    name = cfg.strategy.name
    if cfg.strategy.fallback not in ("fsdp", "error"):
        raise ConfigError(f"strategy.fallback={cfg.strategy.fallback!r}: use fsdp or error")
    from pretrain.engine.zero import deepspeed_config, unavailable_reason

    # Built (and the user's JSON read) before anything else: a bad config is an error, not a
    # reason to fall back.
    ds = deepspeed_config(cfg, dist.world_size(), accum=accum)
    reason = unavailable_reason(cfg, process_group.pick_device(cfg))
    if reason is None:
        try:
            from accelerate.utils import DeepSpeedPlugin

            from pretrain.engine.zero import ZeroEngine

            plugin = DeepSpeedPlugin(hf_ds_config=ds)
            accelerator = process_group.make_accelerator(cfg, deepspeed_plugin=plugin)
            return ZeroEngine(cfg, accelerator, accum)
        except Exception as e:  # noqa: BLE001 - any failure to start DeepSpeed
            reason = f"DeepSpeed failed to initialise ({type(e).__name__}: {e})"
            process_group.reset_accelerate_state()
    mode, what = strategies.FSDP_EQUIVALENT[name]
    if cfg.strategy.fallback == "error":
        raise StrategyUnavailable(
            f"strategy={name} needs DeepSpeed, which cannot be used here: {reason}. Fix the "
            f"DeepSpeed install, or set strategy.fallback=fsdp to run its FSDP equivalent "
            f"({what}) instead"
        )
    dist.log0(
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

        engine: Engine = DDPEngine(cfg, process_group.make_accelerator(cfg), accum)
        engine.name = name
        return engine
    # Sharded strategies need a process group, of one rank in a lone process.
    process_group.lone_process_group_env()
    if name in ("fsdp", "fsdp_grad_op", "hsdp"):
        return _fsdp_engine(cfg, accum, name, name)
    return _zero_engine(cfg, accum)


__all__ = ["Engine", "StrategyUnavailable", "create_engine"]
