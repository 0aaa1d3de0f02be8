"""Typed configuration for training, registered with Hydra's ConfigStore.

Every key has a typed default and a one-line docstring (the string under the field).
`conf/config.yaml` puts the schema `base_config` first in its defaults list, so every YAML
preset and command-line override is merged into it in struct mode: an unknown key or a
wrong type fails before anything runs. `check_overrides` gives unknown keys a friendlier
message (the valid keys and the closest match) than Hydra's own.
"""

from __future__ import annotations

import difflib
import re
import sys
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pretrain.model import GPTConfig

# Every parallelism strategy `strategy.name` can select (pretrain/engine implements them).
STRATEGIES = (
    "single",
    "ddp",
    "zero1",
    "zero2",
    "zero3",
    "zero3_offload",
    "fsdp",
    "fsdp_grad_op",
    "hsdp",
)


# A source's name in data.mix: it becomes part of metric names (tokens/<name>).
SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")

# Metrics a sweep can optimise: each is logged by the training loop (pretrain/training/).
OBJECTIVES = ("val_loss", "val_ppl", "loss")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: default run directory name and W&B run name."""
    dir: str = "runs/${run.name}"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, wandb/ are written here."""
    seed: int = 1337
    """Seed of model initialisation and dropout (each rank offsets it by its rank)."""


@dataclass
class SourceConfig:
    dir: str = ""
    """A directory written by `python -m pretrain.prepare` (local, http(s):// or pipe:)."""
    weight: float = 1.0
    """Its share of the training windows (the weights of a mixture are normalised)."""


@dataclass
class DataConfig:
    dir: str = "data/demo"
    """Directory written by `python -m pretrain.prepare` (holds manifest.json); unused with mix."""
    mix: dict[str, SourceConfig] = field(default_factory=dict)
    """Weighted sources {name: {dir, weight}} read in one run (empty = data.dir alone); another
    mix when a run resumes starts a new phase there."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = read in the training process)."""
    seed: int = 1234
    """Seed of the data order (shards, documents, windows, partitions); new each epoch."""
    partitions: int = 1024
    """Fixed partitions of the data order: the same batches at any ranks x num_workers dividing it."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs (they run shell commands)."""
    verify_sha256: bool = False
    """Check every shard's sha256 before the first step (every shard read is checked anyway)."""


class OptimizerName(str, Enum):
    """`optim.name`: the optimizer (pretrain/optim)."""

    adamw = "adamw"
    muon = "muon"


class MuonAdjustLR(str, Enum):
    """`optim.muon_adjust_lr`: how Muon scales its lr per matrix [A, B] (torch.optim.Muon's)."""

    match_rms_adamw = "match_rms_adamw"
    original = "original"


class MuonNSDtype(str, Enum):
    """`optim.muon_ns_dtype`: the precision Newton-Schulz runs in."""

    bf16 = "bf16"
    fp32 = "fp32"


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    """adamw (every parameter), or muon (Muon for the block matrices, AdamW for the rest)."""
    lr: float = 6e-4
    """Peak learning rate (AdamW; under muon also Muon's, unless optim.muon_lr is set)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matmul weights only (not biases, norms, positions)."""
    l1: float = 0.0
    """L1 penalty (0 = off): after each step, soft-threshold the decayed weights by lr * l1."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    fused: str = "auto"
    """Fused AdamW kernel: auto (on CUDA), true, false."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    muon_lr: float | None = None
    """muon: peak lr of the Muon matrices before muon_adjust_lr (null = optim.lr), scheduled alike."""
    muon_adjust_lr: MuonAdjustLR = MuonAdjustLR.match_rms_adamw
    """muon: match_rms_adamw (lr * 0.2 * sqrt(max(A, B)): AdamW's lr carries over) or original
    (lr * sqrt(max(1, A / B)), Keller Jordan's: set optim.muon_lr ~0.02)."""
    muon_weight_decay: float | None = None
    """muon: decoupled weight decay of the Muon matrices (null = optim.weight_decay)."""
    muon_momentum: float = 0.95
    """muon: momentum of the Muon matrices' buffer."""
    muon_nesterov: bool = True
    """muon: Nesterov momentum."""
    muon_ns_steps: int = 5
    """muon: Newton-Schulz iterations that orthogonalise each update."""
    muon_ns_dtype: MuonNSDtype = MuonNSDtype.bf16
    """muon: Newton-Schulz in bf16 (torch.optim.Muon's; GPUs, CPUs with AVX512-BF16/AMX) or fp32
    (CPUs without bf16 matmuls, where it was 22x faster on the measured CPU: BENCHMARKS.md)."""


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """Learning-rate schedule: cosine (warmup + cosine), wsd (warmup-stable-decay), constant."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to optim.lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr (cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final linear decay."""


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    """Compute precision: fp32, bf16 (autocast) or fp16 (autocast + dynamic loss scaling)."""


@dataclass
class StrategyConfig:
    name: str = "auto"
    """auto (follow the launcher: see pretrain/engine/launcher.py), single, ddp, zero1, zero2,
    zero3, zero3_offload, fsdp, fsdp_grad_op, hsdp."""
    fallback: str = "fsdp"
    """When DeepSpeed cannot be used: fsdp (run the FSDP equivalent, say so) or error."""
    deepspeed_config: str = ""
    """Path to a DeepSpeed JSON whose keys override the generated DeepSpeed config."""
    reduce_bucket_size: int = 0
    """DeepSpeed reduce/allgather/prefetch bucket size in elements (0 = sized to the model:
    `pretrain.engine.strategies.zero_bucket_elements`)."""
    hsdp_replicas: int = 0
    """hsdp: number of replica groups (0 = number of nodes)."""
    trim_heap_in_backward: bool = True
    """zero3/zero3_offload on CPU: return the heap's freed activations to the OS in backward (a
    153M GPT's peak RSS 24-27% lower, for 10% of its CPU throughput: BENCHMARKS.md)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    seq_len: int = 256
    """Tokens per training window (the data is packed at load time; no re-prepare)."""
    micro_batch: int = 8
    """Sequences per forward pass per rank."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all ranks (0 = micro_batch * seq_len * world_size);
    gradient accumulation is derived from it."""
    stop_at_step: int = 0
    """Save a checkpoint and exit cleanly at this step (0 = off): one schedule over several jobs."""
    compile: bool = False
    """Compile the model with torch.compile (in place: checkpoint names do not change)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    host_mmap_threshold_kib: int = 0
    """Host blocks of this many KiB or more go back to the OS when freed, so RSS follows the live
    tensors, at a page-fault cost (glibc; 0 = glibc's own threshold: faster, keeps freed blocks)."""
    eval_every: int = 200
    """Validation loss and perplexity every N steps (0 = only at the end)."""
    eval_batches: int = 10
    """Micro-batches of the val split per validation."""
    early_stop_patience: int = 0
    """Stop (saved, exit 0) after this many validations without a new best val loss (0 = off)."""
    early_stop_min_delta: float = 0.0
    """A validation is a new best only if it beats the best val loss by more than this."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cuda or cpu."""
    init_from: str = ""
    """Start from trained weights: a run dir, a checkpoint, a Hugging Face model dir or a
    compressed model dir (step 0, fresh optimizer and schedule, a new W&B run); unused when a
    checkpoint is resumed."""
    keep_sparsity: bool = True
    """With init_from: block matmul weights that are exactly zero in the source (an
    unstructured-pruned model) stay zero while training (pretrain/pruning.py)."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Log metrics every N steps."""
    wandb: bool = True
    """Log to Weights & Biases (see wandb_mode; once started, W&B never stops training)."""
    wandb_project: str = "pretrain"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (team); empty = your default."""
    wandb_mode: str = "auto"
    """auto (online if WANDB_API_KEY and reachable, else offline), online, offline, disabled."""
    wandb_init_timeout_s: float = 7.0
    """Seconds to reach W&B at start before auto logs offline instead (and online fails)."""
    wandb_group: str = ""
    """W&B group; empty = none, or the sweep's name for a trial of a sweep (one group per sweep)."""
    peak_flops: float = 0.0
    """Peak FLOP/s per device for MFU (0 = look up the device in the peak table)."""
    progress: bool = True
    """Show a progress bar on an interactive terminal."""
    plot: bool = True
    """Write loss.png (train and val loss against step) into the run dir when the run ends."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save a checkpoint every N steps (and always at the end)."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints."""
    resume: str = "auto"
    """auto (newest complete checkpoint in the run dir), none, or a checkpoint directory."""
    async_save: bool = False
    """Write checkpoints in the background: training stalls only while the state is copied to
    host memory (which holds one more copy of this rank's state for the run)."""


@dataclass
class DistConfig:
    timeout_s: int = 600
    """Collective timeout: a dead or stuck rank fails the job within this many seconds."""


@dataclass
class SweepConfig:
    objective: str = "val_loss"
    """The metric a sweep optimises: a trial's result is its last logged value (val_loss, val_ppl
    or loss); hydra.sweeper.direction says whether lower or higher is better."""
    dir: str = ""
    """The sweep directory this run is a trial of; set for every trial of a multirun (`-m`)."""
    storage: str = ""
    """Set by hydra/sweeper=optuna: the study's storage (a journal file or a database URL)."""
    study_name: str = ""
    """Set by hydra/sweeper=optuna: the study this run is a trial of."""
    trial: int = -1
    """Set by hydra/sweeper=optuna: this run's trial number (its validation losses go to the
    study's pruner); -1 outside an Optuna sweep."""


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    """Model architecture (conf/model presets)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prepared shards and loader."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Mixed precision."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """Parallelism strategy."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop: steps, batch, sequence length."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, metrics.jsonl, W&B."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention and resume."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run name, directory, seed."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Hyperparameter search: the objective, and which sweep and trial a run belongs to."""


def validate(cfg: Config) -> None:
    """Cross-field checks that Hydra's types cannot express; each names the fix."""
    choices: dict[str, tuple[str, tuple[str, ...]]] = {
        "schedule.name": (cfg.schedule.name, ("cosine", "wsd", "constant")),
        "precision.dtype": (cfg.precision.dtype, ("fp32", "bf16", "fp16")),
        "strategy.fallback": (cfg.strategy.fallback, ("fsdp", "error")),
        "strategy.name": (cfg.strategy.name, ("auto", *STRATEGIES)),
        "logging.wandb_mode": (cfg.logging.wandb_mode, ("auto", "online", "offline", "disabled")),
        "train.device": (cfg.train.device, ("auto", "cuda", "cpu")),
        "sweep.objective": (cfg.sweep.objective, OBJECTIVES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    positive: dict[str, float] = {
        "logging.every": cfg.logging.every,
        "checkpoint.every": cfg.checkpoint.every,
        "train.max_steps": cfg.train.max_steps,
        "train.micro_batch": cfg.train.micro_batch,
        "train.seq_len": cfg.train.seq_len,
        "dist.timeout_s": cfg.dist.timeout_s,
        "logging.wandb_init_timeout_s": cfg.logging.wandb_init_timeout_s,
    }
    for key, number in positive.items():
        if number <= 0:
            raise ConfigError(f"{key}={number} must be a positive number")
    if cfg.train.init_from and cfg.checkpoint.resume not in ("auto", "none"):
        raise ConfigError(
            f"train.init_from={cfg.train.init_from} and checkpoint.resume="
            f"{cfg.checkpoint.resume} both name weights to start from: continue that run with "
            "checkpoint.resume alone, or start a new one from its weights with train.init_from"
        )
    non_negative: dict[str, float] = {
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.l1": cfg.optim.l1,
        "optim.grad_clip": cfg.optim.grad_clip,
        "train.early_stop_patience": cfg.train.early_stop_patience,
        "train.early_stop_min_delta": cfg.train.early_stop_min_delta,
        "train.host_mmap_threshold_kib": cfg.train.host_mmap_threshold_kib,
        "train.global_batch_tokens": cfg.train.global_batch_tokens,
        "train.stop_at_step": cfg.train.stop_at_step,
        "train.eval_every": cfg.train.eval_every,
        "train.eval_batches": cfg.train.eval_batches,
        "schedule.warmup_steps": cfg.schedule.warmup_steps,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for key, number in non_negative.items():
        if number < 0:
            raise ConfigError(f"{key}={number} must be 0 (off) or positive")
    at_least = {"data.num_workers": (cfg.data.num_workers, 0), "data.seed": (cfg.data.seed, 0),
                "data.partitions": (cfg.data.partitions, 1), "optim.lr": (cfg.optim.lr, 0)}  # fmt: skip
    for key, (count, low) in at_least.items():
        if count < low:
            raise ConfigError(f"{key}={count} must be at least {low}")
    in_range = {
        "optim.beta1": (cfg.optim.beta1, 0.0, 1.0, False),
        "optim.beta2": (cfg.optim.beta2, 0.0, 1.0, False),
        "schedule.min_lr_ratio": (cfg.schedule.min_lr_ratio, 0.0, 1.0, True),
        "schedule.decay_fraction": (cfg.schedule.decay_fraction, 0.0, 1.0, True),
    }
    for key, (fraction, lo, hi, closed) in in_range.items():
        if not (lo <= fraction <= hi if closed else lo <= fraction < hi):
            raise ConfigError(f"{key}={fraction} must be in [{lo}, {hi}{']' if closed else ')'}")
    if not cfg.optim.eps > 0:
        raise ConfigError(f"optim.eps={cfg.optim.eps} must be positive (e.g. 1e-8)")
    if cfg.optim.lr == 0:
        warnings.warn("optim.lr=0: the weights will not change", stacklevel=2)
    if cfg.train.host_mmap_threshold_kib > 32 * 1024:  # glibc's ceiling (HEAP_MAX_SIZE / 2)
        raise ConfigError(
            f"train.host_mmap_threshold_kib={cfg.train.host_mmap_threshold_kib} is above glibc's "
            "largest mmap threshold, 32768 (32 MiB): use at most that, or 0 for glibc's own"
        )
    for name, source in cfg.data.mix.items():
        if not SOURCE_NAME.fullmatch(name):
            raise ConfigError(
                f"data.mix.{name}: a source's name is letters, digits, '_' and '-' (it names "
                "its metrics: tokens/<name>, val_loss/<name>)"
            )
        if not source.dir:
            raise ConfigError(f"data.mix.{name}.dir is empty: give the source's prepared dir")
        if not source.weight > 0:
            raise ConfigError(
                f"data.mix.{name}.weight={source.weight} must be positive (leave the source out "
                "to stop reading it)"
            )
    if cfg.train.early_stop_patience > 0 and (
        cfg.train.eval_every <= 0 or cfg.train.eval_batches <= 0
    ):
        raise ConfigError(
            f"train.early_stop_patience={cfg.train.early_stop_patience} needs periodic "
            f"validation, but train.eval_every={cfg.train.eval_every} and "
            f"train.eval_batches={cfg.train.eval_batches}: set both to positive numbers"
        )


def register() -> None:
    node = OmegaConf.structured(Config)
    # A mixture's sources are named on the command line (`data.mix={web: {...}}`): the dict
    # takes new names, while each source's keys stay SourceConfig's (a typo is refused).
    OmegaConf.set_struct(node.data.mix, False)
    ConfigStore.instance().store(name="base_config", node=node)


register()

# Hydra config groups whose options are chosen by name (`model=tiny`), not keys.
GROUPS = ("model", "data", "optim", "schedule", "precision", "strategy", "logging", "checkpoint")


def _schema_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(node):
        key = prefix + f.name
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        out[key] = default
        if is_dataclass(default):
            out.update(_schema_keys(default, key + "."))
    return out


def unknown_key(key: str) -> str | None:
    """None for a config key (or group) that exists; else what is wrong, with the closest valid
    key and the valid keys next to it (two lines)."""
    valid = _schema_keys(Config)
    key = key.lstrip("+")
    if key in GROUPS or key == "experiment" or key in valid:
        return None
    if key.startswith("data.mix."):  # data.mix.<source>[.<key>]: any name, SourceConfig's keys
        _, _, name, *rest = key.split(".")
        keys = [f.name for f in fields(SourceConfig)]
        if len(rest) == 0 or (len(rest) == 1 and rest[0] in keys):
            return None
        close = difflib.get_close_matches(rest[0], keys, n=1)
        hint = f" Did you mean 'data.mix.{name}.{close[0]}'?" if close else ""
        return (
            f"unknown config key '{key}'.{hint}\nValid keys under 'data.mix.{name}': "
            f"{', '.join(keys)}"
        )
    parent, _, leaf = key.rpartition(".")
    siblings = sorted(k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == parent)
    if not siblings:  # the parent is unknown too: compare the first part with the top level
        parent, leaf = "", key.split(".")[0]
        siblings = sorted(k for k in valid if "." not in k)
    close = difflib.get_close_matches(leaf, siblings, n=1)
    hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
    where = parent or "<top level>"
    return f"unknown config key '{key}'.{hint}\nValid keys under '{where}': {', '.join(siblings)}"


def check_overrides(argv: list[str]) -> None:
    """Fail early, with the valid keys, on a command-line override naming an unknown key.

    Hydra would refuse it too, but only says the key is not in the struct."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "hydra.", "hydra/", "+hydra", "~")):
            continue
        key = arg.split("=", 1)[0]
        problem = unknown_key(key)
        if problem is None and key.lstrip("+") == "data.mix":
            problem = _unknown_source_key(arg)
        if problem is not None:
            sys.stderr.write(f"error: {problem}\n")
            raise SystemExit(2)


def _unknown_source_key(arg: str) -> str | None:
    """What is wrong with a `data.mix={name: {...}}` override's source keys, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_overrides([arg])[0].value()
    except Exception:  # noqa: BLE001 - a syntax error: Hydra reports it as it does any
        return None
    if not isinstance(value, dict):
        return None
    for name, source in value.items():
        for key in source if isinstance(source, dict) else ():
            problem = unknown_key(f"data.mix.{name}.{key}")
            if problem is not None:
                return problem
    return None


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (for YAML, JSON and W&B)."""
    out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
