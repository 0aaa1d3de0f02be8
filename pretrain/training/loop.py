"""`train(cfg)`: one run, top to bottom: setup, build, resume, loop, teardown.

It runs the same under `python`, `torchrun` and `accelerate launch`; the strategy
(`strategy=...`) is the engine's business, not the loop's. Each component builds itself from
its own config section and owns its decisions: the loader the data order, the checkpointer the
cadence and what to resume, the validator when to validate and what follows from it, the
metrics when to log, `Stops` why the loop ends early and with which exit status.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain import dist
from pretrain.checkpoint import Checkpointer
from pretrain.config import Config, validate
from pretrain.data.loader import TokenLoader
from pretrain.early_stopping import EarlyStopping
from pretrain.engine import Engine, create_engine
from pretrain.failpoint import failpoint
from pretrain.flops import flops_per_token
from pretrain.metrics import Metrics
from pretrain.optim import Schedule, build_optimizer
from pretrain.training.guards import DivergenceGuard, Preemption, Stop, Stops
from pretrain.training.rundir import RunDir
from pretrain.training.setup import batch_geometry, model_config, open_data
from pretrain.training.start import start_point
from pretrain.training.state import TrainState
from pretrain.training.throughput import Throughput
from pretrain.training.validate import Validator


@dataclass
class RunEnd:
    """How `train` ended: the exit status, and where the run got to."""

    exit_code: int
    step: int
    tokens_seen: int
    pruned: bool = False  # stopped by the sweep's pruner (pretrain.sweep.trial.Pruner)


def train(cfg: Config) -> RunEnd:
    # ---- setup: config, data, process group, run directory -------------------------------
    preemption = Preemption()  # first: a signal during a slow startup must not kill us unsaved
    validate(cfg)
    data = open_data(cfg)  # its manifests read once, handed to every reader of the data
    # The world size comes from the launcher's environment, so the engine is created knowing
    # its accumulation.
    accum, tokens_per_step = batch_geometry(cfg, dist.world_size())
    engine = create_engine(cfg, accum)
    dist.watch_peers()  # one rank's failure stops every rank within a second
    model_cfg = model_config(cfg, data.manifest)
    run_dir = RunDir.create(cfg, model_cfg, data.manifest)

    # ---- build: model (parallelised by the engine), optimizer, data, state ---------------
    engine.build(model_cfg, lambda m: build_optimizer(m, cfg.optim, engine.device))
    loader = TokenLoader.from_config(
        cfg.data, data.readable, "train", cfg.train.seq_len, cfg.train.micro_batch,
        rank=engine.rank, world_size=engine.world_size,
        expected_tokenizer_sha256=run_dir.tokenizer_sha256,
    )  # fmt: skip
    early_stopping = EarlyStopping.from_config(cfg.train)
    state = TrainState(loader, early_stopping, strategy=engine.name)
    state.seed(cfg.run.seed)
    ckpt = Checkpointer.from_config(
        cfg.checkpoint, run_dir.path, run_dir.resolved, cfg.train.max_steps
    )

    # ---- resume: this run's newest checkpoint, or another model's weights ------------------
    origin = start_point(cfg, ckpt, engine, state, model_cfg, data.manifest, run_dir)
    metrics = Metrics.from_config(
        cfg.logging, run_dir.path, run_dir.resolved, run_id=state.run_id,
        run_name=cfg.run.name, start_step=state.step, total_steps=cfg.train.max_steps,
    )  # fmt: skip
    validator = Validator.from_config(cfg, data, engine, early_stopping, run_dir.path)
    stops = Stops.from_config(cfg.train, engine, preemption, validator)
    metrics.print(banner(engine, loader, accum, tokens_per_step, run_dir, origin, state))
    if loader.phase_change:  # resumed with another data.mix: a new phase from here
        metrics.print(loader.phase_change)
    if validator.stopped_early:
        metrics.print(
            f"nothing to train: this run stopped early at step {state.step}: "
            f"{validator.why_stopped}. To train on, raise train.early_stop_patience (or set it "
            "to 0)."
        )
    idle = stops.before(state.step)
    if idle:
        metrics.print(idle)

    # ---- loop ----------------------------------------------------------------------------
    batches = state.start()  # last before the loop: the saved RNG streams come back here
    schedule = Schedule.from_config(cfg.optim, cfg.schedule, cfg.train.max_steps)
    guard = DivergenceGuard(engine, model_cfg.vocab_size)
    meter = Throughput(engine, tokens_per_step, flops_per_token(model_cfg, cfg.train.seq_len))
    stop: Stop | None = None
    while state.step < cfg.train.max_steps and not validator.stopped_early and not idle:
        step_loss = torch.zeros((), device=engine.device)
        for micro in range(accum):
            x, y = next(batches)  # [micro_batch, seq_len] each
            x, y = x.to(engine.device, non_blocking=True), y.to(engine.device, non_blocking=True)
            failpoint("train.micro_step")
            step_loss += engine.micro_step(x, y, last=micro == accum - 1) / accum
        lr = schedule.lr(state.step)
        grad_norm = engine.optimizer_step(lr, schedule.grad_clip)
        state.advance(tokens_per_step)
        guard.observe(step_loss, grad_norm)
        meter.add(step_loss)
        preempted = False
        if metrics.due(state.step):
            preempted = stops.signalled()
            guard.check(state.step, ckpt.last_good)
            metrics.log(
                state.step,
                {**meter.flush(lr=lr, grad_norm=grad_norm, tokens_seen=state.tokens_seen),
                 **state.sources_read(per_source=data.mixture)},
            )  # fmt: skip
        metrics.advance(state.step)
        saved = ckpt.poll()  # a background save that completed (or failed: raised here)
        if saved:
            metrics.print(saved)
        with meter.paused():
            val = validator.run(state.step, metrics.log) if validator.due(state.step) else None
            stop = stops.after(state.step, preempted=preempted, pruned=bool(val and val.pruned))
            best = bool(val and val.new_best)
            if ckpt.due(state.step, stop=stop is not None, best=best):
                guard.check(state.step, ckpt.last_good)  # weights that saw a NaN are never saved
                metrics.print(ckpt.save(engine, state, best=best))
        if stop is not None:
            break

    # ---- teardown ------------------------------------------------------------------------
    saved = ckpt.close()  # the save in flight is written (or its failure raised) before the end
    if saved:
        metrics.print(saved)
    if stop is not None:
        metrics.print(stop.message(ckpt))
    dist.stop_watching()  # ranks that finish first must not look like failures to the rest
    pruned = stop is not None and stop.pruned
    metrics.finish(state.step == cfg.train.max_steps or validator.stopped_early or pruned)
    dist.barrier()
    run_dir.release()
    return RunEnd(stop.exit_code if stop else 0, state.step, state.tokens_seen, pruned)


def banner(
    engine: Engine,
    loader: TokenLoader,
    accum: int,
    tokens_per_step: int,
    run_dir: RunDir,
    origin: str,
    state: TrainState,
) -> str:
    """The run's first line: model size, strategy, precision, batch, where it starts."""
    return (
        f"pretrain: {engine.num_params / 1e6:.2f}M params | strategy {engine.name} x"
        f"{engine.world_size} ({engine.why}) on {engine.device.type} | "
        f"{engine.cfg.precision.dtype} | batch {tokens_per_step} tokens (micro "
        f"{loader.batch_size} x seq {loader.seq_len} x accum {accum}) | run dir "
        f"{run_dir.path}{origin}"
        + (
            f" | {state.masked_weights:,} pruned weights kept at zero"
            if state.masked_weights
            else ""
        )
    )
