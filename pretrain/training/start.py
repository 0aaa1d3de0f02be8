"""Where a run's weights come from: its own newest checkpoint (a resume: everything continues),
or another model's weights (`train.init_from`: weights only, step 0, a fresh optimizer and
schedule, a W&B run of its own), or the seeded initial values the engine already gave it."""

from __future__ import annotations

from pathlib import Path

from pretrain import checkpoint
from pretrain.checkpoint import Checkpointer
from pretrain.config import Config, ConfigError, OptimizerName
from pretrain.data.format import Manifest
from pretrain.engine import Engine
from pretrain.model import GPTConfig
from pretrain.pretrained import load_for_init
from pretrain.pruning import keep_zeros
from pretrain.training.rundir import RunDir
from pretrain.training.state import TrainState


def start_point(
    cfg: Config,
    ckpt: Checkpointer,
    engine: Engine,
    state: TrainState,
    model_cfg: GPTConfig,
    manifest: Manifest,
    run_dir: RunDir,
) -> str:
    """Collective. Loads what the run starts from into `engine` and `state`; returns how it
    started, for the run's first line ("" for fresh initial values).

    Pruned weights (exact zeros in the block matmuls of an unstructured-pruned source) stay
    zero while training when `train.keep_sparsity` is on: the masks are taken from the source's
    weights, and again from the checkpoint's on every resume (a checkpoint records how many)."""
    path = ckpt.resume_point()
    if path is not None:
        check_same_optimizer(cfg, path)
        ckpt.restore(path, engine, state)
        if state.masked_weights and cfg.train.keep_sparsity:
            weights = checkpoint.load_model_weights(path)
            state.masked_weights = keep_zeros(engine.unwrapped(), weights)
        else:
            state.masked_weights = 0
        return f" | resumed from {path} (step {state.step})"
    if not cfg.train.init_from:
        return ""
    source, weights = load_for_init(
        cfg.train.init_from, model_cfg, manifest, allow_pipe=cfg.data.allow_pipe
    )
    engine.load_model_weights(weights)
    if cfg.train.keep_sparsity:
        state.masked_weights = keep_zeros(engine.unwrapped(), weights)
        if state.masked_weights and OptimizerName(cfg.optim.name) == OptimizerName.muon:
            # Muon's orthogonalised update is dense: it moves the masked weights (which compute
            # as zero but are saved), so a resume or an export would lose the sparsity.
            raise ConfigError(
                f"train.keep_sparsity keeps the {state.masked_weights:,} pruned zeros of "
                f"{cfg.train.init_from} under optim=adamw only (Muon's update is dense): use "
                "optim=adamw, or train.keep_sparsity=false to train the zeros too"
            )
    run_dir.record_init_from(source.path, source.kind)
    return f" | weights from {run_dir.resolved['train']['init_from']}"


def check_same_optimizer(cfg: Config, path: Path) -> None:
    """Refuse to resume a checkpoint written by another optimizer (its state, AdamW's moments or
    Muon's momentum, is no state of this one). A checkpoint from before `optim.name` existed was
    written by AdamW."""
    saved = OptimizerName((checkpoint.read_config(path).get("optim") or {}).get("name", "adamw"))
    wanted = OptimizerName(cfg.optim.name)
    if saved != wanted:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was written with optim={saved.value}, this run has "
            f"optim={wanted.value}: resume with optim={saved.value}, or start a new run.dir "
            f"from its weights with optim={wanted.value} train.init_from={path}"
        )
