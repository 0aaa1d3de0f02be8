"""Which strategy the launcher asks for, and what its settings mean for ours.

`strategy=auto` (the default) follows the launcher:

    one process                                  single
    accelerate launch, distributed_type:
        DEEPSPEED  zero_stage 0 / 1 / 2 / 3      ddp / zero1 / zero2 / zero3
                   zero_stage 3 + offload_param_device cpu            zero3_offload
        FSDP       fsdp_version 2: fsdp_reshard_after_forward true / false
                                                 fsdp / fsdp_grad_op
                   (with a parallelism config of dp_replicate_size > 1: hsdp)
                   fsdp_version 1: fsdp_sharding_strategy FULL_SHARD / SHARD_GRAD_OP /
                   HYBRID_SHARD / _HYBRID_SHARD_ZERO2 / NO_SHARD
                                                 fsdp / fsdp_grad_op / hsdp / hsdp / ddp
        MULTI_GPU                                ddp
    torchrun, Slurm (several processes)          ddp

`accelerate launch` hands its config file to the processes as environment variables
(ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, FSDP_*, ACCELERATE_MIXED_PRECISION,
...); that is what is read here. An explicit `strategy=` that contradicts the accelerate
config is refused with both named; one that agrees runs. Every other setting of the
accelerate config either maps onto ours or, where it disagrees with the Hydra config, stops the
run with both values named (the table in launch/README.md); none is silently ignored: settings
that ours always does one way (ZeRO-3 partitions at creation, checkpoints are sharded, every
transformer block is one FSDP unit) are accepted, with one line where the file asked for
something else.

After reading them, the DeepSpeed variables are removed from the environment: the engine
generates the one DeepSpeed config from the Hydra config (with the accelerate config's
`deepspeed_config_file` merged on top, as `strategy.deepspeed_config`), and Accelerate must not
second-guess it from the environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pretrain import dist
from pretrain.config import STRATEGIES, Config, ConfigError

ACCELERATE_MARKERS = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_DYNAMO_BACKEND",
)
PRECISIONS = {"bf16": "bf16", "fp16": "fp16"}  # accelerate's mixed_precision -> precision.dtype
FSDP1 = {
    "FULL_SHARD": "fsdp",
    "1": "fsdp",
    "SHARD_GRAD_OP": "fsdp_grad_op",
    "2": "fsdp_grad_op",
    "HYBRID_SHARD": "hsdp",
    "4": "hsdp",
    "_HYBRID_SHARD_ZERO2": "hsdp",
    "5": "hsdp",
    "NO_SHARD": "ddp",
    "3": "ddp",
}
ZERO = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}


@dataclass
class Launch:
    """What the launcher implies: a strategy (None: nothing), why, and notes to print."""

    strategy: str | None
    why: str
    notes: list[str] = field(default_factory=list)


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def under_accelerate(env: Mapping[str, str]) -> bool:
    return any(k in env for k in ACCELERATE_MARKERS)


def _ds_file(env: Mapping[str, str]) -> dict:
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not path or path == "none":
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"the accelerate config's deepspeed_config_file={path} cannot be read as JSON ({e})"
        ) from e


def _deepspeed(cfg: Config, env: Mapping[str, str], accum: int) -> Launch:
    ds = _ds_file(env)
    zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else {}
    stage_s = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or str(zero.get("stage", ""))
    if stage_s in ("", "auto"):
        stage_s = "2"  # accelerate's own default stage
    stage = int(stage_s)
    if stage not in ZERO:
        raise ConfigError(f"the accelerate config asks for DeepSpeed zero_stage={stage}: use 0-3")
    offload_param = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE") or str(
        zero.get("offload_param", {}).get("device", "none")
    )
    offload_opt = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") or str(
        zero.get("offload_optimizer", {}).get("device", "none")
    )
    where = f"DEEPSPEED zero_stage {stage}"
    for what, device in (
        ("offload_param_device", offload_param),
        ("offload_optimizer_device", offload_opt),
    ):
        if device not in ("none", "cpu"):
            raise ConfigError(
                f"the accelerate config asks for {what}={device}: pretrain offloads to CPU memory "
                f"only (zero3_offload); use {what}: cpu or none"
            )
    strategy = ZERO[stage]
    if offload_param == "cpu" or offload_opt == "cpu":
        if stage != 3 or offload_param != "cpu":
            raise ConfigError(
                f"the accelerate config asks for {where} with offload_param_device="
                f"{offload_param}, offload_optimizer_device={offload_opt}: pretrain offloads "
                "parameters and optimizer state together, with ZeRO-3 (zero3_offload): use "
                "zero_stage: 3 with offload_param_device: cpu and offload_optimizer_device: "
                "cpu, or no offload"
            )
        strategy, where = "zero3_offload", where + " + offload to cpu"
    launch = Launch(strategy, f"accelerate config: {where}")
    # Settings with a Hydra counterpart must agree with it.
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING") or ds.get("gradient_clipping")
    if clip not in (None, "", "none", "auto") and float(clip) != float(cfg.optim.grad_clip):
        raise _disagree("gradient_clipping", clip, "optim.grad_clip", cfg.optim.grad_clip)
    steps = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS") or ds.get(
        "gradient_accumulation_steps"
    )
    if steps not in (None, "", "auto") and int(steps) != accum:
        raise ConfigError(
            f"the accelerate config sets gradient_accumulation_steps={steps}, but the Hydra "
            f"config gives {accum} (train.global_batch_tokens / (micro_batch x seq_len x "
            f"world size)): set gradient_accumulation_steps: {accum} in the accelerate config "
            "(or remove it), or change train.global_batch_tokens"
        )
    for key, dtype in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled = ds.get(key, {}).get("enabled") if isinstance(ds.get(key), dict) else None
        if enabled is True and cfg.precision.dtype != dtype:
            raise _disagree(f"deepspeed_config_file {key}.enabled", True, "precision.dtype",
                            cfg.precision.dtype)  # fmt: skip
    if "ACCELERATE_DEEPSPEED_ZERO3_INIT" in env and not _true(
        env["ACCELERATE_DEEPSPEED_ZERO3_INIT"]
    ):
        launch.notes.append(
            "zero3_init_flag=false: ZeRO-3 parameters are always created partitioned here "
            "(what zero3_init_flag: true does); nothing else changes"
        )
    if _true(env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")):
        launch.notes.append(
            "zero3_save_16bit_model=true: checkpoints hold fp32 weights in a portable sharded "
            "form; `python -m pretrain.export <run> <out> --format hf --dtype bf16` writes a "
            "16-bit model"
        )
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path != "none":
        if cfg.strategy.deepspeed_config and Path(cfg.strategy.deepspeed_config) != Path(path):
            raise _disagree("deepspeed_config_file", path, "strategy.deepspeed_config",
                            cfg.strategy.deepspeed_config)  # fmt: skip
        cfg.strategy.deepspeed_config = path
    return launch


def _fsdp(cfg: Config, env: Mapping[str, str]) -> Launch:
    version = env.get("FSDP_VERSION", "1")
    if version == "2":
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
        strategy = "fsdp" if _true(reshard) else "fsdp_grad_op"
        where = f"FSDP fsdp_version 2, fsdp_reshard_after_forward {reshard.lower()}"
        replicas = int(env.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1") or 1)
        if _true(env.get("ACCELERATE_USE_PARALLELISM_CONFIG")) and replicas > 1:
            strategy, where = "hsdp", where + f", dp_replicate_size {replicas}"
            if cfg.strategy.hsdp_replicas not in (0, replicas):
                raise _disagree("dp_replicate_size", replicas, "strategy.hsdp_replicas",
                                cfg.strategy.hsdp_replicas)  # fmt: skip
            cfg.strategy.hsdp_replicas = replicas
    else:
        sharding = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if sharding not in FSDP1:
            raise ConfigError(
                f"the accelerate config's fsdp_sharding_strategy={sharding} is unknown"
            )
        strategy = FSDP1[sharding]
        where = f"FSDP fsdp_sharding_strategy {sharding}"
    launch = Launch(strategy, f"accelerate config: {where}")
    if _true(env.get("FSDP_OFFLOAD_PARAMS")):
        raise ConfigError(
            "the accelerate config asks for fsdp_offload_params: true: pretrain offloads with "
            "DeepSpeed ZeRO-3 (strategy zero3_offload; its FSDP equivalent without DeepSpeed): "
            "use a DEEPSPEED config with zero_stage: 3 and offload_param_device: cpu, or "
            "fsdp_offload_params: false"
        )
    ac = env.get("FSDP_ACTIVATION_CHECKPOINTING")
    if ac is not None and _true(ac) != bool(cfg.train.activation_checkpointing):
        raise _disagree("fsdp_activation_checkpointing", ac.lower(),
                        "train.activation_checkpointing", cfg.train.activation_checkpointing)  # fmt: skip
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    classes = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block")
    if policy != "TRANSFORMER_BASED_WRAP" or classes.replace(" ", "") not in ("Block", ""):
        launch.notes.append(
            f"fsdp_auto_wrap_policy={policy}, fsdp_transformer_layer_cls_to_wrap={classes}: "
            "every transformer block (Block) is one FSDP unit here, the embeddings and head "
            "another"
        )
    if env.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT") != "SHARDED_STATE_DICT":
        launch.notes.append(
            f"fsdp_state_dict_type={env['FSDP_STATE_DICT_TYPE']}: checkpoints are always "
            "sharded (torch distributed checkpoint, loadable at any world size); "
            "`python -m pretrain.export` writes full weights"
        )
    return launch


def _disagree(acc_key: str, acc_value: object, key: str, value: object) -> ConfigError:
    return ConfigError(
        f"the accelerate config sets {acc_key}={acc_value}, but the Hydra config has "
        f"{key}={value}: make them agree (set {key} to match, or change the accelerate config)"
    )


def from_launcher(cfg: Config, accum: int, env: Mapping[str, str] | None = None) -> Launch:
    """What the launcher that started this process asks for (reads the environment)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if not under_accelerate(env):
        if world > 1:
            return Launch("ddp", f"{world} processes (torchrun or Slurm)")
        return Launch("single", "one process")
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp == "fp8":
        raise ConfigError("the accelerate config asks for mixed_precision=fp8: use bf16 or no")
    if mp in PRECISIONS and PRECISIONS[mp] != cfg.precision.dtype:
        raise _disagree("mixed_precision", mp, "precision.dtype", cfg.precision.dtype)
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        return _deepspeed(cfg, env, accum)
    if _true(env.get("ACCELERATE_USE_FSDP")):
        return _fsdp(cfg, env)
    if world > 1:
        return Launch("ddp", "accelerate config: MULTI_GPU")
    return Launch("single", "accelerate launch, one process")


def resolve_strategy(cfg: Config, accum: int, env: Mapping[str, str] | None = None) -> str:
    """Set `cfg.strategy.name` to a concrete strategy (from the launcher when it is `auto`);
    returns why, for the banner. Refuses a `strategy=` that contradicts the accelerate config,
    and launcher settings that disagree with the Hydra config."""
    env = os.environ if env is None else env
    asked = cfg.strategy.name
    if asked != "auto" and asked not in STRATEGIES:
        raise ConfigError(
            f"unknown strategy={asked!r}: choose auto or one of {', '.join(STRATEGIES)}"
        )
    launch = from_launcher(cfg, accum, env)
    accelerate_decides = under_accelerate(env) and launch.why.startswith("accelerate config")
    if asked == "auto":
        assert launch.strategy is not None
        cfg.strategy.name = launch.strategy
        why = f"auto: {launch.why}"
    else:
        if accelerate_decides and asked != launch.strategy:
            raise ConfigError(
                f"strategy={asked} contradicts the {launch.why} (which means "
                f"strategy={launch.strategy}): drop strategy= to follow the accelerate config, "
                f"or launch with a config file that asks for {asked}"
            )
        why = f"strategy={asked}" + (f", as the {launch.why}" if accelerate_decides else "")
    for note in launch.notes:
        dist.log0(f"note: {note}")
    # The engine writes the one DeepSpeed config; Accelerate must not rebuild one from these.
    if env is os.environ:
        for key in [k for k in os.environ if k.startswith("ACCELERATE_DEEPSPEED_")] + [
            "ACCELERATE_CONFIG_DS_FIELDS",
            "ACCELERATE_GRADIENT_CLIPPING",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        ]:
            os.environ.pop(key, None)
    return why
