"""`python -m pretrain.train experiment=<name> [overrides]`: the training loop.

One `train(cfg)` that reads top to bottom: setup, build, resume, loop, teardown. It runs the
same under `python`, `torchrun` and `accelerate launch`; the strategy (`strategy=...`) is the
engine's business, not the loop's.

Exit status: 0 when max_steps (or train.stop_at_step) is reached or early stopping ends the run
(`train.early_stop_patience`: saved, `best` marked); 75 (EX_TEMPFAIL) after
SIGTERM/SIGUSR1, acted on at the next logging step with a checkpoint saved, so that a launcher
requeues the job; 1 with a one-line message for a bad config, bad data, a NaN loss, a failed
checkpoint save, or W&B that cannot start with logging.wandb_mode=online. In a multirun (`-m`,
pretrain/sweep/) a trial's result or failure goes to the sweeper instead, which goes on (or
stops, as configured); a preempted trial still ends the whole sweep with 75.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from pretrain import checkpoint, dist
from pretrain.checkpoint import Checkpointer
from pretrain.config import Config, ConfigError, check_overrides, to_dict, validate
from pretrain.data.loader import TokenLoader
from pretrain.data.shards import DataError, is_local, local_path, read_manifest
from pretrain.early_stopping import EarlyStopping
from pretrain.engine import Engine, create_engine
from pretrain.failpoint import failpoint
from pretrain.flops import flops_per_token, peak_flops
from pretrain.metrics import (
    Metrics,
    WandbUnavailable,
    memory_bytes,
    new_run_id,
    plot_loss_curve,
)
from pretrain.model import GPTConfig
from pretrain.optim import build_optimizer, lr_at
from pretrain.pretrained import load_for_init
from pretrain.pruning import keep_zeros
from pretrain.sweep import trial as sweep_trial
from pretrain.tokenizer import file_sha256

EXIT_REQUEUE = 75


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunEnd:
    """How `train` ended: the exit status, and where the run got to."""

    exit_code: int
    step: int
    tokens_seen: int
    pruned: bool = False  # stopped by the sweep's pruner (pretrain.sweep.trial.Pruner)


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; at the next logging step the loop saves and exits 75."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


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


def check_data_dir(data_dir: str) -> str:
    if not is_local(data_dir):
        return data_dir  # a URL: read_manifest names what is wrong with it
    path = local_path(data_dir)
    if not (path / "manifest.json").is_file():
        raise ConfigError(
            f"data.dir={data_dir} holds no prepared data (no manifest.json). Prepare it first: "
            f"`python -m pretrain.prepare output={data_dir}` (add input=<glob> for your corpus), "
            "or point data.dir at a prepared directory."
        )
    return data_dir


@torch.no_grad()
def evaluate(engine: Engine, cfg: Config, data_dir: str) -> dict[str, float]:
    """Validation loss and perplexity over `train.eval_batches` micro-batches of the val split.

    Every rank evaluates the same val batches: sharded strategies need every rank in every
    forward, and the val split is small. The mean is therefore already global; averaging it
    over ranks once more makes it the same number on every rank, bit for bit, which the
    decisions taken on it (early stopping, best checkpoints) rely on."""
    loader = TokenLoader(
        data_dir,
        "val",
        cfg.train.seq_len,
        cfg.train.micro_batch,
        seed=cfg.data.seed,
        loop=False,
        partitions=None,  # as many as val has windows (up to 1024): the first batches span it
        allow_pipe=cfg.data.allow_pipe,
    )
    total, n = torch.zeros((), device=engine.device), 0
    for x, y in loader:
        total += engine.eval_loss(x.to(engine.device), y.to(engine.device))
        n += 1
        if n >= cfg.train.eval_batches:
            break
    val = float(engine.all_reduce_mean(total / max(n, 1)).item())
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


def eval_due(cfg: Config, step: int) -> bool:
    every = cfg.train.eval_every
    return cfg.train.eval_batches > 0 and (
        (every > 0 and step % every == 0) or step == cfg.train.max_steps
    )


class DivergenceGuard:
    """Remembers whether a loss, or a gradient norm where the engine does not expect non-finite
    ones (fp16's scaler skips such steps by design), was NaN/inf since the run started.

    `check` is a collective, called at logging and checkpoint steps only: a per-step one would
    stall the GPU queue. It raises before weights that saw a NaN can reach a checkpoint, so the
    last good checkpoint survives."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.bad = torch.zeros((), dtype=torch.bool, device=engine.device)
        self.since = 0  # steps since the last check

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(loss)
        if not self.engine.skips_overflow_steps:
            self.bad |= ~torch.isfinite(grad_norm.to(self.bad.device))
        self.since += 1

    def check(self, step: int, last_good: Path | None) -> None:
        if self.engine.any_rank(bool(self.bad.item())):
            raise NonFiniteLoss(
                f"the loss became NaN/inf between step {step - self.since} and step {step}. "
                f"Nothing was saved after it; the last good checkpoint is "
                f"{last_good or 'none'}. Lower optim.lr, raise schedule.warmup_steps, use "
                "precision=bf16 instead of fp16, or check the data; then resume with "
                "checkpoint.resume=auto."
            )
        self.since = 0


class Throughput:
    """Loss and tokens/s between logging steps, with validation and saving left out."""

    def __init__(self, engine: Engine, tokens_per_step: int, flops_per_token: float) -> None:
        self.engine, self.tokens_per_step, self.fpt = engine, tokens_per_step, flops_per_token
        device = engine.device
        self.peak = engine.cfg.logging.peak_flops or peak_flops(
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            engine.cfg.precision.dtype,
        )
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t

    def flush(self) -> dict[str, Any]:
        """Collective (the mean loss over ranks): the metrics since the last flush."""
        elapsed = time.perf_counter() - self.t0
        tps = self.steps * self.tokens_per_step / elapsed
        out = {
            "loss": float(self.engine.all_reduce_mean(self.loss_sum / self.steps).item()),
            "tokens_per_s": tps,
            "mfu": tps * self.fpt / (self.peak * self.engine.world_size) if self.peak else None,
            "step_time_s": elapsed / self.steps,
            "mem_gb": memory_bytes(self.engine.device) / 1e9,
        }
        self.loss_sum.zero_()
        self.steps, self.t0 = 0, time.perf_counter()
        return out


def model_config(cfg: Config, vocab_size: int, data_dir: str) -> GPTConfig:
    """The model's architecture: `model.*`, with the vocabulary taken from the data."""
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))  # type: ignore[arg-type]
    if model_cfg.vocab_size == 0:
        model_cfg.vocab_size = vocab_size
    elif model_cfg.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size} in {data_dir}: leave model.vocab_size=0 to take it from the data"
        )
    if cfg.train.seq_len > model_cfg.block_size:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds model.block_size={model_cfg.block_size}"
        )
    try:
        return model_cfg.validate()
    except ValueError as e:  # the model's own validation: bad head counts, choices, ...
        raise ConfigError(str(e)) from e


def train(cfg: Config) -> RunEnd:
    # ---- setup: config, data, process group, run directory -------------------------------
    preempt = Preemption()  # first: a signal during a slow startup must not kill us unsaved
    validate(cfg)  # type: ignore[arg-type]
    data_dir = check_data_dir(cfg.data.dir)
    manifest = read_manifest(data_dir, allow_pipe=cfg.data.allow_pipe)
    # The world size comes from the launcher's environment, so the engine is created knowing
    # its accumulation.
    accum, tokens_per_step = batch_geometry(cfg, dist.world_size())
    engine = create_engine(cfg, accum)
    dist.watch_peers()  # one rank's failure stops every rank within a second
    run_dir = Path(cfg.run.dir)
    resolved = to_dict(cfg)  # type: ignore[arg-type]
    model_cfg = model_config(cfg, manifest.vocab_size, data_dir)
    resolved["model"]["vocab_size"] = model_cfg.vocab_size
    expected_tok = setup_run_dir(run_dir, resolved, data_dir, manifest)

    # ---- build: model (parallelised by the engine), optimizer ----------------------------
    engine.build(model_cfg, lambda m: build_optimizer(m, cfg.optim, engine.device))
    torch.manual_seed(cfg.run.seed + 1 + engine.rank)  # dropout differs per rank

    # ---- resume --------------------------------------------------------------------------
    ckpt = Checkpointer(run_dir, cfg.checkpoint, resolved, cfg.train.max_steps)
    stopper = EarlyStopping(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta)
    resume_from = ckpt.resume_point()
    step, tokens_seen, run_id, loader_states = 0, 0, new_run_id(), None
    masked = 0  # pruned weights kept at zero (an unstructured-pruned init_from source)
    if resume_from is not None:
        saved = ckpt.restore(resume_from, engine)
        step, tokens_seen, loader_states = saved["step"], saved["tokens_seen"], saved["loader"]
        # The same W&B run and the same early-stopping count continue only in the same run
        # directory; a run branched from another run's checkpoint starts its own.
        if ckpt.same_run(resume_from):
            run_id = saved["wandb_run_id"]
            stopper.load_state_dict(saved.get("early_stopping"))
        if saved.get("masked_weights") and cfg.train.keep_sparsity:  # the zeros it kept
            masked = keep_zeros(engine.unwrapped(), checkpoint.load_model_weights(resume_from))
    elif cfg.train.init_from:  # weights only: step 0, a fresh optimizer and schedule, a new run
        source, weights = load_for_init(
            cfg.train.init_from, model_cfg, manifest, allow_pipe=cfg.data.allow_pipe
        )
        engine.load_model_weights(weights)
        if cfg.train.keep_sparsity:
            masked = keep_zeros(engine.unwrapped(), weights)
        resolved["train"]["init_from"] = str(source.path.resolve())  # in config.yaml and W&B
        write_config(run_dir, resolved)
    train_loader = TokenLoader(
        data_dir,
        "train",
        cfg.train.seq_len,
        cfg.train.micro_batch,
        rank=engine.rank,
        world_size=engine.world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.data.seed,
        partitions=cfg.data.partitions,
        allow_pipe=cfg.data.allow_pipe,
        verify_sha256=cfg.data.verify_sha256,
        expected_tokenizer_sha256=expected_tok,
    )
    if loader_states is not None:
        train_loader.load_state_dict(loader_states)
    metrics = Metrics(
        run_dir,
        resolved,
        wandb_enabled=cfg.logging.wandb,
        project=cfg.logging.wandb_project,
        entity=cfg.logging.wandb_entity,
        mode=cfg.logging.wandb_mode,
        run_id=run_id,
        run_name=cfg.run.name,
        total_steps=cfg.train.max_steps,
        start_step=step,
        progress=cfg.logging.progress,
        init_timeout_s=cfg.logging.wandb_init_timeout_s,
        group=cfg.logging.wandb_group,
    )
    pruner = sweep_trial.Pruner(cfg, run_dir)  # a trial of an Optuna sweep reports to its study
    metrics.print(
        f"pretrain: {engine.num_params / 1e6:.2f}M params | strategy {engine.name} x"
        f"{engine.world_size} ({engine.why}) on {engine.device.type} | {cfg.precision.dtype} | batch "
        f"{tokens_per_step} tokens (micro {cfg.train.micro_batch} x seq {cfg.train.seq_len} x "
        f"accum {accum}) | run dir {run_dir}"
        + (f" | resumed from {resume_from} (step {step})" if resume_from else "")
        + (
            f" | weights from {resolved['train']['init_from']}"
            if not resume_from and cfg.train.init_from
            else ""
        )
        + (f" | {masked:,} pruned weights kept at zero" if masked else "")
    )
    if stopper.should_stop:
        metrics.print(
            f"nothing to train: this run stopped early at step {step}: {stopper.reason}. "
            "To train on, raise train.early_stop_patience (or set it to 0)."
        )

    # ---- loop ----------------------------------------------------------------------------
    batches = iter(train_loader)
    if resume_from is not None:
        checkpoint.restore_rng(resume_from, engine.world_size)  # last: see restore_rng
    guard = DivergenceGuard(engine)
    meter = Throughput(engine, tokens_per_step, flops_per_token(model_cfg, cfg.train.seq_len))
    exit_code, pruned = 0, False
    while step < cfg.train.max_steps and not stopper.should_stop:
        step_loss = torch.zeros((), device=engine.device)
        for micro in range(accum):
            x, y = next(batches)  # [micro_batch, seq_len] each
            x, y = x.to(engine.device, non_blocking=True), y.to(engine.device, non_blocking=True)
            failpoint("train.micro_step")
            step_loss += engine.micro_step(x, y, last=micro == accum - 1) / accum
        lr = lr_at(step, cfg.train.max_steps, cfg.optim.lr, cfg.schedule)
        grad_norm = engine.optimizer_step(lr, cfg.optim.grad_clip)
        step += 1
        tokens_seen += tokens_per_step
        guard.observe(step_loss, grad_norm)
        meter.add(step_loss)

        log_now = step % cfg.logging.every == 0 or step == cfg.train.max_steps
        # Ranks agree on a signal at logging steps only (they synchronise there anyway).
        preempted = log_now and engine.any_rank(preempt.signum is not None)
        stopping = 0 < cfg.train.stop_at_step <= step
        if log_now:
            guard.check(step, ckpt.latest())
            values = meter.flush()
            metrics.log(step, {"loss": values.pop("loss"), "lr": lr,
                               "grad_norm": float(grad_norm.item()), **values,
                               "tokens_seen": tokens_seen})  # fmt: skip
        metrics.advance(step)
        with meter.paused():
            new_best = False
            if eval_due(cfg, step):
                val = evaluate(engine, cfg, data_dir)
                metrics.log(step, val)
                new_best = stopper.observe(step, val["val_loss"])
                pruned = engine.any_rank(pruner.report(step, val))  # the sweep's pruner: stop?
            stop = preempted or stopping or stopper.should_stop or pruned
            if ckpt.due(step, stop=stop, best=new_best):
                guard.check(step, ckpt.latest())  # weights that saw a NaN are never saved
                train_state = {"tokens_seen": tokens_seen, "epoch": train_loader.epoch,
                               "wandb_run_id": run_id, "strategy": engine.name,
                               "early_stopping": stopper.state_dict(),
                               "masked_weights": masked}  # fmt: skip
                path = ckpt.save(step, engine, train_state, train_loader, best=new_best)
                metrics.print(f"saved checkpoint {path}" + (" (best)" if new_best else ""))
        if preempted:
            metrics.print(f"preempted (signal {preempt.signum}) at step {step}: saved, exiting")
            # At max_steps the run is done: nothing left to requeue for.
            exit_code = EXIT_REQUEUE if step < cfg.train.max_steps else 0
            break
        if stopping:
            metrics.print(f"train.stop_at_step={step} reached: saved, exiting")
            break
        if stopper.should_stop:
            metrics.print(
                f"early stop at step {step}: {stopper.reason}. Saved, exiting; the best "
                f"checkpoint is {ckpt.root / checkpoint.BEST} -> {ckpt.best}"
            )
            break
        if pruned:
            metrics.print(f"pruned at step {step}: the sweep's pruner stopped this trial; saved")
            break

    # ---- teardown ------------------------------------------------------------------------
    dist.stop_watching()  # ranks that finish first must not look like failures to the rest
    metrics.close()
    finished = step == cfg.train.max_steps or stopper.should_stop or pruned
    if cfg.logging.plot and dist.is_main() and finished:
        try:
            plot_loss_curve(run_dir)
        except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
            metrics.print(f"warning: no loss curve ({type(e).__name__}: {e})")
    dist.barrier()
    return RunEnd(exit_code, step, tokens_seen, pruned)


def setup_run_dir(run_dir: Path, resolved: dict[str, Any], data_dir: str, manifest: Any) -> str:
    """Rank 0 writes the resolved config and keeps a copy of the tokenizer in the run
    directory; returns the tokenizer hash the data must have (a collective).

    With its own tokenizer a run needs no data dir to sample, and a resumed run pointed at
    shards made with another tokenizer is refused instead of training on noise."""
    run_tok = run_dir / "tokenizer.model"
    expected = file_sha256(run_tok) if run_tok.is_file() else manifest.tokenizer_sha256
    dist.barrier()
    write_config(run_dir, resolved)
    if dist.is_main() and not run_tok.is_file() and is_local(data_dir):
        shutil.copyfile(local_path(data_dir) / manifest.tokenizer, run_tok)
    dist.barrier()
    return expected


def write_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Rank 0: the resolved config as run_dir/config.yaml."""
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))


EXPECTED_ERRORS = (
    ConfigError,
    DataError,
    checkpoint.CheckpointError,
    NonFiniteLoss,
    WandbUnavailable,
)


def run(cfg: DictConfig) -> tuple[RunEnd | None, str]:
    """`train`, with expected failures turned into (None, their message)."""
    try:
        if cfg.sweep.dir:
            sweep_trial.check(cfg)
            sweep_trial.claim_run_dir(cfg)  # a trial only ever continues as itself
        return train(cfg), ""  # type: ignore[arg-type]
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        # Every rank learns of the failure at once (dist.watch_peers); only the job's first
        # failure is reported: later ones on other ranks are its consequences.
        first = dist.report_failure(f"{type(e).__name__}: {e}")
        if not isinstance(e, EXPECTED_ERRORS):
            if first:
                raise  # a bug: Hydra prints the traceback
        elif first:
            # Expected failures get their message, not a traceback.
            print(f"error: {e}", file=sys.stderr, flush=True)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        if dist.initialized():
            with contextlib.suppress(Exception):  # best effort on the way out
                torch.distributed.destroy_process_group()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _main(cfg: DictConfig) -> float | None:
    """One run; in a multirun (`-m`), one trial, whose objective goes back to the sweeper."""
    multirun = sweep_trial.in_multirun()
    if multirun:
        sweep_trial.prepare(cfg)  # its own run dir, a W&B run in the sweep's group
    dist.adopt_slurm_tasks()  # srun started every rank itself (Hydra's submitit launcher)
    started = time.time()
    # Hydra's basic launcher runs the next trial in this same process.
    with sweep_trial.restored_process() if multirun else contextlib.nullcontext():
        end, error = run(cfg)
        code = 1 if end is None else end.exit_code
        result = None
        if code == 0 and end is not None and cfg.sweep.dir:  # still holding the trial's dir
            result = sweep_trial.finish(cfg, end.step, end.tokens_seen, end.pruned, started)
    if result is not None and multirun:
        return sweep_trial.returned(result)
    if code and multirun and code != EXIT_REQUEUE:
        # The sweeper records a failed trial and goes on (or stops, as it is configured).
        raise sweep_trial.TrialFailed(f"error: trial in {cfg.run.dir} failed: {error}")
    # os._exit would skip W&B's flush; sys.exit after teardown is safe.
    sys.stdout.flush()
    if code:
        sys.exit(code)  # a preempted sweep stops as a whole, to be continued by re-running it
    return None


def main() -> None:
    argv = sys.argv[1:]
    if any(a in ("-m", "--multirun") for a in argv) and several_processes():
        sys.stderr.write(
            "error: a sweep (-m) runs in one process: started on every rank, each rank would "
            "choose its own parameters. Run it with plain `python -m pretrain.train -m ...` and "
            "let each trial start its processes: hydra/launcher=torchrun "
            "hydra.launcher.nproc_per_node=N, or hydra/launcher=submitit_slurm on Slurm\n"
        )
        raise SystemExit(2)
    check_overrides(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    _main()


def several_processes() -> bool:
    """Whether this process is one of several ranks started together (torchrun, srun -n N)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1


if __name__ == "__main__":
    main()
