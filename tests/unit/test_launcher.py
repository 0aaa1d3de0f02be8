"""strategy=auto: what each launcher environment means, read from the variables `accelerate
launch` sets from a config file (the same names, as tests/integration/test_accelerate.py shows
them arriving from real launches), torchrun's and a lone process's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from pretrain.config import ConfigError
from pretrain.engine.launcher import from_launcher, resolve_strategy

REPO = Path(__file__).resolve().parents[2]
ACC = {"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2"}


def cfg(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=["experiment=debug", *overrides])


def ds(stage: str, **extra: str) -> dict[str, str]:
    return {**ACC, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage,
            **extra}  # fmt: skip


def fsdp(**extra: str) -> dict[str, str]:
    return {**ACC, "ACCELERATE_USE_FSDP": "true", "ACCELERATE_DYNAMO_BACKEND": "NO", **extra}


@pytest.mark.parametrize(
    "env, strategy",
    [
        ({}, "single"),
        ({"WORLD_SIZE": "4"}, "ddp"),  # torchrun, Slurm
        ({"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "1"}, "single"),
        ({**ACC, "ACCELERATE_DYNAMO_BACKEND": "NO"}, "ddp"),  # MULTI_GPU
        (ds("0"), "ddp"),
        (ds("1"), "zero1"),
        (ds("2"), "zero2"),
        (ds("3"), "zero3"),
        (ds("3", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu",
            ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu"), "zero3_offload"),
        (fsdp(FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="true"), "fsdp"),
        (fsdp(FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="false"), "fsdp_grad_op"),
        (fsdp(FSDP_VERSION="2", ACCELERATE_USE_PARALLELISM_CONFIG="true",
              PARALLELISM_CONFIG_DP_REPLICATE_SIZE="2"), "hsdp"),
        (fsdp(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="FULL_SHARD"), "fsdp"),
        (fsdp(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="SHARD_GRAD_OP"), "fsdp_grad_op"),
        (fsdp(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="HYBRID_SHARD"), "hsdp"),
        (fsdp(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="NO_SHARD"), "ddp"),
    ],
)  # fmt: skip
def test_the_launcher_decides(env: dict[str, str], strategy: str) -> None:
    c = cfg()
    why = resolve_strategy(c, accum=1, env=env)
    assert c.strategy.name == strategy
    assert why.startswith("auto: ")


def test_the_stage_comes_from_a_deepspeed_config_file(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}))
    c = cfg()
    env = {**ACC, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    resolve_strategy(c, 1, env)
    assert c.strategy.name == "zero1"
    assert c.strategy.deepspeed_config == str(path)  # merged on top of the generated config


@pytest.mark.parametrize(
    "env, overrides, message",
    [
        ({**ACC, "ACCELERATE_MIXED_PRECISION": "bf16"}, (), "mixed_precision=bf16"),
        (ds("2", ACCELERATE_GRADIENT_CLIPPING="0.5"), (), "optim.grad_clip=1.0"),
        (ds("2", ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4"), (), "gradient_accumulation_steps=4"),
        (ds("2", ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu"), (), "zero3_offload"),
        (ds("3", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="nvme"), (), "nvme"),
        (fsdp(FSDP_OFFLOAD_PARAMS="true"), (), "fsdp_offload_params"),
        (fsdp(FSDP_ACTIVATION_CHECKPOINTING="true"), (), "train.activation_checkpointing"),
        (ds("3"), ("strategy=zero2",), "strategy=zero2 contradicts"),
        ({**ACC, "ACCELERATE_DYNAMO_BACKEND": "NO"}, ("strategy=fsdp",), "strategy=fsdp contradicts"),
    ],
)  # fmt: skip
def test_disagreements_are_refused_with_both_named(
    env: dict[str, str], overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_strategy(cfg(*overrides), accum=1, env=env)


def test_agreeing_settings_and_strategy_run() -> None:
    c = cfg("strategy=zero3", "precision=bf16", "optim.grad_clip=0.5")
    env = ds("3", ACCELERATE_MIXED_PRECISION="bf16", ACCELERATE_GRADIENT_CLIPPING="0.5",
             ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2")  # fmt: skip
    why = resolve_strategy(c, accum=2, env=env)
    assert c.strategy.name == "zero3" and why.startswith("strategy=zero3, as the accelerate config")
    # Outside accelerate an explicit strategy is simply what runs.
    c = cfg("strategy=zero2")
    assert resolve_strategy(c, 1, {"WORLD_SIZE": "2"}) == "strategy=zero2"


def test_settings_done_one_way_here_are_said_not_ignored() -> None:
    launch = from_launcher(cfg(), 1, ds("3", ACCELERATE_DEEPSPEED_ZERO3_INIT="false",
                                        ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true"))  # fmt: skip
    assert any("zero3_init_flag=false" in n for n in launch.notes)
    assert any("zero3_save_16bit_model=true" in n for n in launch.notes)
    launch = from_launcher(cfg(), 1, fsdp(FSDP_AUTO_WRAP_POLICY="SIZE_BASED_WRAP",
                                          FSDP_STATE_DICT_TYPE="FULL_STATE_DICT"))  # fmt: skip
    assert len(launch.notes) == 2
