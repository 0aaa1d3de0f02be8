"""The run's facts, derived once from the config before anything is built: the prepared data
(its sources' manifests, read here and handed to every reader of them), the batch geometry, and
the model's architecture: `model.*` with the vocabulary taken from the data, or a source's
own."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from pretrain.checkpoint import find_resume
from pretrain.config import Config, ConfigError
from pretrain.data.format import Manifest
from pretrain.data.mixture import Source, check_sources
from pretrain.data.shards import is_local, local_path, read_manifest
from pretrain.model import GPTConfig
from pretrain.pretrained import (
    architecture_mismatches,
    check_source_tokenizer,
    refuse_mismatches,
    source_config,
    source_tokenizer,
)


@dataclass
class RunData:
    """The run's training data, its manifests read once: one unnamed source for `data.dir`, or
    the named, weighted sources of `data.mix` (which share one tokenizer: checked)."""

    sources: list[Source]

    @property
    def manifest(self) -> Manifest:
        """The first source's manifest: the tokenizer and vocabulary every source shares."""
        return self.sources[0].manifest

    @property
    def mixture(self) -> bool:
        """Whether the sources are named (`data.mix`): their metrics are logged apart."""
        return bool(self.sources[0].name)

    @property
    def readable(self) -> Manifest | list[Source]:
        """What a `TokenLoader` reads: the sources of a mixture, or the one manifest (whose
        loader state keeps the single-source form that earlier checkpoints hold)."""
        return self.sources if self.mixture else self.manifest


def open_data(cfg: Config) -> RunData:
    """The sources of the run, each refused in one line naming it when it holds no prepared
    data, lacks a split the run reads, or was prepared with another tokenizer than the rest."""
    data = cfg.data
    if not data.mix:
        return RunData([Source("", _manifest("data.dir", data.dir, data.allow_pipe), 1.0)])
    sources = [
        Source(name, _manifest(f"data.mix.{name}.dir", src.dir, data.allow_pipe), src.weight)
        for name, src in data.mix.items()
    ]
    check_sources(sources, "train")
    if cfg.train.eval_batches > 0:  # every source is validated on its own val split
        for source in sources:
            if not source.manifest.has("val"):
                raise ConfigError(
                    f"data.mix.{source.name} ({source.manifest.source}) has no val split, which "
                    "validation reads for every source: re-run prepare for it, or set "
                    "train.eval_batches=0"
                )
    return RunData(sources)


def _manifest(key: str, path: str, allow_pipe: bool) -> Manifest:
    """The manifest of the prepared dir `path` (config key `key`), with what to do when it
    holds no prepared data."""
    if is_local(path) and not (local_path(path) / "manifest.json").is_file():
        raise ConfigError(
            f"{key}={path} holds no prepared data (no manifest.json). Prepare it first: "
            f"`python -m pretrain.prepare output={path}` (add input=<glob> for your corpus), "
            "or point it at a prepared directory."
        )
    # A URL: read_manifest names what is wrong with it.
    return read_manifest(path, allow_pipe=allow_pipe)


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
    """The model's architecture: `model.*`, with the vocabulary taken from the data; or, for a
    run started from trained weights (`train.init_from`), the source's (`source_model`)."""
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))  # type: ignore[arg-type]
    if cfg.train.init_from:
        model_cfg = source_model(cfg, model_cfg, manifest)
    elif model_cfg.vocab_size == 0:
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


def source_model(cfg: Config, configured: GPTConfig, manifest: Manifest) -> GPTConfig:
    """A run started from trained weights is built as its source: the user does not restate
    `model.*`. Its architecture comes from the source (or, once the run has a checkpoint to
    resume, from that checkpoint: a requeued job does not need the source again); training
    choices (dropout, init_std, pad_vocab_to) stay `model.*`'s. A `model.*` key set on the
    command line (or a `model=<preset>` chosen there) that contradicts the architecture is
    refused, key by key."""
    resume = find_resume(Path(cfg.run.dir) / "checkpoints", cfg.checkpoint.resume)
    source = str(resume) if resume is not None else cfg.train.init_from
    arch = source_config(source)
    if resume is None:
        # Before anything is written: data of another tokenizer (which also means another
        # vocabulary: that is its cause, not a model.vocab_size to change), ids past the
        # source's rows, a source without a tokenizer.
        check_source_tokenizer(
            source, source_tokenizer(source), arch.vocab_size, manifest,
            allow_pipe=cfg.data.allow_pipe, required=True,
        )  # fmt: skip
    given = command_line_model_keys()
    bad = architecture_mismatches(arch, configured)
    refuse_mismatches(source, [b for b in bad if "model" in given or b[0] in given])
    return replace(
        arch,
        dropout=configured.dropout,
        init_std=configured.init_std,
        pad_vocab_to=configured.pad_vocab_to,
    )


def command_line_model_keys() -> set[str]:
    """The `model.*` keys set on this run's command line (Hydra's overrides), and "model" when
    a model preset was chosen there; empty outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "model" or key.startswith("model."):
            keys.add(key.removeprefix("model."))
    return keys
