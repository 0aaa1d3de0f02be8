"""`python -m pretrain.train experiment=<name> [overrides]`: the training loop.

One `train(cfg)` that reads top to bottom: setup, build, resume, loop, teardown. It runs the
same under `python`, `torchrun` and `accelerate launch`; the strategy (`strategy=...`) is the
engine's business, not the loop's.

Exit status: 0 when max_steps (or train.stop_at_step) is reached; 75 (EX_TEMPFAIL) after
SIGTERM/SIGUSR1, acted on at the next logging step with a checkpoint saved, so that a launcher
requeues the job; 1 with a one-line message for a bad config, bad data, a NaN loss or a failed
checkpoint save.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from pretrain import checkpoint, dist
from pretrain.config import Config, ConfigError, check_overrides, to_dict, validate
from pretrain.data.loader import TokenLoader
from pretrain.data.shards import DataError, is_local, local_path, read_manifest
from pretrain.engine import Engine, create_engine
from pretrain.flops import flops_per_token, peak_flops
from pretrain.metrics import Metrics, memory_bytes, new_run_id, plot_loss_curve
from pretrain.model import GPT, GPTConfig
from pretrain.optim import build_optimizer, lr_at
from pretrain.tokenizer import file_sha256

EXIT_REQUEUE = 75


class NonFiniteLoss(RuntimeError):
    pass


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
def evaluate(engine: Engine, cfg: Config, data_dir: str, device: torch.device) -> float:
    # Every rank evaluates the same val batches: sharded strategies need every rank in every
    # forward, and the val split is small. The mean is therefore already global.
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
    total, n = torch.zeros((), device=device), 0
    for x, y in loader:
        total += engine.eval_loss(x.to(device), y.to(device))
        n += 1
        if n >= cfg.train.eval_batches:
            break
    return float(total.item() / max(n, 1))


def train(cfg: Config) -> int:
    # ---- setup: process group, device, run directory ------------------------------------
    preempt = Preemption()  # first: a signal during a slow startup must not kill us unsaved
    validate(cfg)  # type: ignore[arg-type]
    engine = create_engine(cfg)
    device = engine.device
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    resolved = to_dict(cfg)  # type: ignore[arg-type]
    data_dir = check_data_dir(cfg.data.dir)
    manifest = read_manifest(data_dir, allow_pipe=cfg.data.allow_pipe)
    # The run keeps a copy of its tokenizer: samples need no data dir, and a resumed run
    # pointed at shards made with another tokenizer is refused instead of training on noise.
    run_tok = run_dir / "tokenizer.model"
    expected_tok = file_sha256(run_tok) if run_tok.is_file() else manifest.tokenizer_sha256
    dist.barrier()
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        if not run_tok.is_file() and is_local(data_dir):
            shutil.copyfile(local_path(data_dir) / manifest.tokenizer, run_tok)
    dist.barrier()

    accum, tokens_per_step = batch_geometry(cfg, engine.world_size)
    engine.accum = accum

    # ---- build: model, optimizer --------------------------------------------------------
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))  # type: ignore[arg-type]
    if model_cfg.vocab_size == 0:
        model_cfg.vocab_size = manifest.vocab_size
    elif model_cfg.vocab_size < manifest.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{manifest.vocab_size} in {data_dir}: leave model.vocab_size=0 to take it from the data"
        )
    if cfg.train.seq_len > model_cfg.block_size:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds model.block_size={model_cfg.block_size}"
        )
    resolved["model"]["vocab_size"] = model_cfg.vocab_size
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    try:
        model = GPT(model_cfg)
    except ValueError as e:  # the model's own validation: bad head counts, choices, ...
        raise ConfigError(str(e)) from e
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        # In place: parameter names (and so checkpoints) stay those of the plain model.
        model.compile()
    n_params = model.num_params()  # before setup: ZeRO-3 partitions parameters in place
    engine.setup(model, lambda m: build_optimizer(m, cfg.optim, device))
    torch.manual_seed(cfg.run.seed + 1 + engine.rank)  # dropout differs per rank

    # ---- resume ----------------------------------------------------------------------
    step, tokens_seen, run_id = 0, 0, new_run_id()
    loader_states: list[dict[str, Any]] | None = None
    resume_from = checkpoint.find_resume(ckpt_root, cfg.checkpoint.resume)
    if dist.is_main():
        checkpoint.prepare_root(ckpt_root, resume_from, cfg.checkpoint.resume)
    dist.barrier()
    if resume_from is not None:
        state = engine.state_dict()
        ts = checkpoint.load(resume_from, state)
        engine.load_state_dict(state)
        step, tokens_seen = ts["step"], ts["tokens_seen"]
        # The same W&B run continues only in the same run directory; a run branched from
        # another run's checkpoint gets a run of its own.
        if resume_from.parent.resolve() == ckpt_root.resolve():
            run_id = ts["wandb_run_id"]
        loader_states = ts["loader"]
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
    )
    fpt = flops_per_token(model_cfg, cfg.train.seq_len)
    peak = cfg.logging.peak_flops or peak_flops(
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        cfg.precision.dtype,
    )
    metrics.print(
        f"pretrain: {n_params / 1e6:.2f}M params | strategy {engine.name} x{engine.world_size} "
        f"on {device.type} | {cfg.precision.dtype} | batch {tokens_per_step} tokens "
        f"(micro {cfg.train.micro_batch} x seq {cfg.train.seq_len} x accum {accum}) | "
        f"run dir {run_dir}"
        + (f" | resumed from {resume_from} (step {step})" if resume_from else "")
    )

    def save() -> Path:
        train_state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "epoch": train_loader.epoch,
            "loader": gather_loader_states(train_loader),
            "wandb_run_id": run_id,
            "world_size": engine.world_size,
            "strategy": engine.name,
        }
        path = checkpoint.save(
            ckpt_root,
            step,
            engine.state_dict(),
            train_state,
            resolved,
            cfg.checkpoint.keep_last,
            native_saver=engine.save_native if engine.name.startswith("zero") else None,
        )
        metrics.print(f"saved checkpoint {path}")
        return path

    # ---- loop ---------------------------------------------------------------------------
    batches = iter(train_loader)
    if resume_from is not None:
        checkpoint.restore_rng(resume_from, engine.world_size)
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    last_saved = step
    t_last, steps_since = time.perf_counter(), 0
    exit_code = 0
    while step < cfg.train.max_steps:
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = next(batches)  # [micro_batch, seq_len] each
            loss = engine.micro_step(
                x.to(device, non_blocking=True), y.to(device, non_blocking=True), micro == accum - 1
            )
            step_loss += loss / accum
        lr = lr_at(step, cfg.train.max_steps, cfg.optim.lr, cfg.schedule)
        grad_norm = engine.optimizer_step(lr, cfg.optim.grad_clip)
        step += 1
        tokens_seen += tokens_per_step
        steps_since += 1
        loss_sum += step_loss
        nonfinite |= ~torch.isfinite(step_loss)
        if cfg.precision.dtype != "fp16":  # fp16's scaler skips overflowing steps by design
            nonfinite |= ~torch.isfinite(grad_norm)
        log_now = step % cfg.logging.every == 0 or step == cfg.train.max_steps
        # Ranks agree on a signal at logging steps only: the loss all-reduce syncs there anyway,
        # and a per-step collective would stall the GPU queue every step.
        preempted = log_now and engine.any_rank(preempt.signum is not None)
        stopping = 0 < cfg.train.stop_at_step <= step
        ckpt_now = (
            step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps or preempted or stopping
        )
        # A NaN must never reach a checkpoint: the last good one has to survive it.
        if (log_now or ckpt_now) and engine.any_rank(bool(nonfinite.item())):
            raise NonFiniteLoss(
                f"the loss became NaN/inf between step {step - steps_since} and step {step}. "
                f"Nothing was saved after it; the last good checkpoint is "
                f"{checkpoint.find_resume(ckpt_root, 'auto') or 'none'}. Lower optim.lr, "
                "raise schedule.warmup_steps, use precision=bf16 instead of fp16, or check "
                "the data; then resume with checkpoint.resume=auto."
            )
        if log_now:
            elapsed = time.perf_counter() - t_last
            tps = steps_since * tokens_per_step / elapsed
            mean_loss = float(engine.all_reduce_mean(loss_sum / steps_since).item())
            metrics.log(
                step,
                {
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm.item()),
                    "tokens_per_s": tps,
                    "mfu": (tps * fpt / (peak * engine.world_size)) if peak else None,
                    "step_time_s": elapsed / steps_since,
                    "mem_gb": memory_bytes(device) / 1e9,
                    "tokens_seen": tokens_seen,
                },
            )
            loss_sum.zero_()
            t_last, steps_since = time.perf_counter(), 0
        metrics.advance(step)
        t_other = time.perf_counter()
        eval_now = cfg.train.eval_batches > 0 and (
            (cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0)
            or step == cfg.train.max_steps
        )
        if eval_now:
            val = evaluate(engine, cfg, data_dir, device)
            metrics.log(step, {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
        if ckpt_now and step != last_saved:
            save()
            last_saved = step
        # Validation and saving are not training throughput: leave their time out of tokens/s.
        t_last += time.perf_counter() - t_other
        if preempted:
            metrics.print(f"preempted (signal {preempt.signum}) at step {step}: saved, exiting")
            # At max_steps the run is done: nothing left to requeue for.
            exit_code = EXIT_REQUEUE if step < cfg.train.max_steps else 0
            break
        if stopping:
            metrics.print(f"train.stop_at_step={step} reached: saved, exiting")
            break

    # ---- teardown -----------------------------------------------------------------------
    metrics.close()
    if dist.is_main() and step == cfg.train.max_steps:
        try:
            plot_loss_curve(run_dir)
        except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
            metrics.print(f"warning: no loss curve ({type(e).__name__}: {e})")
    dist.barrier()
    return exit_code


def gather_loader_states(loader: TokenLoader) -> list[dict[str, Any]]:
    """Every rank's loader position, so any world size can take over the epoch."""
    state = loader.state_dict()
    if dist.world_size() == 1:
        return [state]
    out: list[Any] = [None] * dist.world_size()
    torch.distributed.all_gather_object(out, state)
    return out


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _main(cfg: DictConfig) -> None:
    try:
        code = train(cfg)  # type: ignore[arg-type]
    except (ConfigError, DataError, checkpoint.CheckpointError, NonFiniteLoss) as e:
        # Expected failures get their message, not a traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if dist.initialized():
            with contextlib.suppress(Exception):  # best effort on the way out
                torch.distributed.destroy_process_group()
    # os._exit would skip W&B's flush; sys.exit after teardown is safe.
    sys.stdout.flush()
    if code:
        sys.exit(code)


def main() -> None:
    check_overrides(sys.argv[1:])
    os.environ.setdefault("WANDB_SILENT", "true")
    _main()


if __name__ == "__main__":
    main()
