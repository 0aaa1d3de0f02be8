"""The run's facts, derived once from the config before anything is built: the prepared data
(its manifest, read here and handed to every reader of it), the batch geometry, and the model's
architecture with the vocabulary taken from the data."""

from __future__ import annotations

from omegaconf import OmegaConf

from pretrain.config import Config, ConfigError, DataConfig
from pretrain.data.format import Manifest
from pretrain.data.shards import is_local, local_path, read_manifest
from pretrain.model import GPTConfig


def open_data(cfg: DataConfig) -> Manifest:
    """The manifest of `data.dir`, with what to do when it holds no prepared data."""
    if is_local(cfg.dir) and not (local_path(cfg.dir) / "manifest.json").is_file():
        raise ConfigError(
            f"data.dir={cfg.dir} holds no prepared data (no manifest.json). Prepare it first: "
            f"`python -m pretrain.prepare output={cfg.dir}` (add input=<glob> for your corpus), "
            "or point data.dir at a prepared directory."
        )
    # A URL: read_manifest names what is wrong with it.
    return read_manifest(cfg.dir, allow_pipe=cfg.allow_pipe)


def batch_geometry(cfg: Config, world_size: int) -> tuple[int, int]:
    """(gradient accumulation steps, tokens per optimizer step) from the global batch."""
    per_micro = cfg.train.micro_batch * cfg.train.seq_len * world_size
    if cfg.train.global_batch_tokens <= 0:
        return 1, per_micro
    if cfg.train.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of "
            f"micro_batch ({cfg.train.micro_batch}) x seq_len ({cfg.train.seq_len}) x "
            f"world_size ({world_size}) = {per_micro}: set it to a multiple, e.g. "
            f"{max(1, round(cfg.train.global_batch_tokens / per_micro)) * per_micro}, "
            "or change micro_batch"
        )
    return cfg.train.global_batch_tokens // per_micro, cfg.train.global_batch_tokens


def model_config(cfg: Config, manifest: Manifest) -> GPTConfig:
    """The model's architecture: `model.*`, with the vocabulary taken from the data."""
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))  # type: ignore[arg-type]
    if model_cfg.vocab_size == 0:
        model_cfg.vocab_size = manifest.vocab_size
    elif model_cfg.vocab_size < manifest.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{manifest.vocab_size} in {cfg.data.dir}: leave model.vocab_size=0 to take it from "
            "the data"
        )
    if cfg.train.seq_len > model_cfg.block_size:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds model.block_size={model_cfg.block_size}"
        )
    try:
        return model_cfg.validate()
    except ValueError as e:  # the model's own validation: bad head counts, choices, ...
        raise ConfigError(str(e)) from e
