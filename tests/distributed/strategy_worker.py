"""Engine-level worker for the strategy tests (run under torchrun, or plainly for 1 process).

For each strategy named in --strategies, in sequence in the same processes: build the `debug`
GPT from a fixed seed, wrap it with `create_engine(cfg)` + `engine.setup`, and train
--steps steps on a fixed stream of global batches. Every rank takes its own rows of each
global batch (rank r, micro-batch m: rows m*B*W + r*B ... + B), so a run at any world size,
micro-batch and accumulation sees exactly the same global batch per step. Rank 0 writes one
JSON record per strategy to --out: per-step global mean loss, gradient norms, the per-rank
memory breakdown measured just before the last optimizer step, and, with --save-at/--load,
checkpoints written and resumed through `pretrain.checkpoint` (the loop's own code).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pretrain import checkpoint, dist  # noqa: E402
from pretrain.config import to_dict  # noqa: E402
from pretrain.engine import create_engine  # noqa: E402
from pretrain.engine.process_group import reset_accelerate_state  # noqa: E402
from pretrain.model import GPT, GPTConfig  # noqa: E402
from pretrain.optim import build_optimizer, lr_at  # noqa: E402

VOCAB = 512


def global_batch(step: int, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable global batch for `step`: counting sequences (next = current + 1) with 25%
    of the tokens replaced by noise. Same on every rank: x, y [rows, seq_len]."""
    g = torch.Generator().manual_seed(10_000 + step)
    start = torch.randint(0, VOCAB, (rows, 1), generator=g)
    seq = (start + torch.arange(seq_len + 1)) % VOCAB  # [rows, T+1]
    noise = torch.randint(0, VOCAB, seq.shape, generator=g)
    seq = torch.where(torch.rand(seq.shape, generator=g) < 0.25, noise, seq)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def full_tensors(tree: Any) -> Any:
    """Copy of a state tree with every DTensor or ShardedTensor (ZeRO's partitions) gathered to
    a full CPU tensor (a collective)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(tree, dict):
        return {k: full_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [full_tensors(v) for v in tree]
    if isinstance(tree, ShardedTensor):
        # Every rank adds its own boxes into zeros; the boxes of all ranks tile the tensor.
        out = torch.zeros(tree.size(), dtype=torch.float64)
        for shard in tree.local_shards():
            box = tuple(
                slice(o, o + n)
                for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
            )
            out[box] = shard.tensor.double().cpu()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(out)
        return out.float()
    if torch.is_tensor(tree):
        full = getattr(tree, "full_tensor", None)
        t = full() if callable(full) else tree
        return t.detach().float().cpu().clone()
    return tree


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter storage this rank holds (meta: none; ZeRO-3: its partitions)."""
    total = 0
    for p in model.parameters():
        for t in (p, getattr(p, "ds_tensor", None)):
            if t is not None and not t.is_meta:
                total += t.untyped_storage().nbytes()
    return total


class AllReduceCounter:
    """Counts torch.distributed.all_reduce calls (FSDP2's HSDP replica reduction is one)."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = torch.distributed.all_reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.real(*args, **kwargs)

        torch.distributed.all_reduce = counting  # type: ignore[assignment]

    def close(self) -> None:
        torch.distributed.all_reduce = self.real  # type: ignore[assignment]


def everyone(value: Any, world: int) -> list[Any]:
    """`value` of every rank, in rank order (a collective)."""
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


WORKER_KEYS = ("steps", "save_at")  # spec keys that set this script's options, not Hydra's


def parse_spec(spec: str, args: argparse.Namespace) -> tuple[str, list[str], dict[str, int]]:
    """`name` or `name:key=value;key=value` -> (name, Hydra overrides, worker options); a
    spec's own values replace the run-wide ones (steps= and save_at= set --steps/--save-at)."""
    name, _, extra = spec.partition(":")
    options = {"steps": args.steps, "save_at": args.save_at}
    values = {
        "experiment": "debug",
        "strategy": name,
        "precision": args.precision,
        "model.vocab_size": str(VOCAB),
        "train.micro_batch": str(args.micro),
        "train.max_steps": str(args.max_steps),
        "dist.timeout_s": "120",
    }
    for item in [*args.set, *(e for e in extra.split(";") if e)]:
        key, _, value = item.partition("=")
        if key in WORKER_KEYS:
            options[key] = int(value)
        else:
            values[key] = value
    return name, [f"{k}={v}" for k, v in values.items()], options


def run_one(args: argparse.Namespace, spec: str, load: str) -> dict[str, Any]:
    ws = dist.world_size()
    strategy, overrides, options = parse_spec(spec, args)
    steps, save_at = options["steps"], options["save_at"]
    cfg = compose(config_name="config", overrides=overrides)
    engine = create_engine(cfg, accum=args.accum)  # type: ignore[arg-type]
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    device = engine.device
    created: dict[str, int] = {}
    create = engine.create

    def spy(mc: GPTConfig) -> Any:  # what a rank holds right after creating the model
        model = create(mc)
        created["bytes"] = parameter_bytes(model)
        return model

    engine.create = spy  # type: ignore[method-assign]
    engine.build(model_cfg, lambda m: build_optimizer(m, cfg.optim, device))
    setup_s = time.perf_counter() - t0
    rank, world = engine.rank, engine.world_size
    assert world == ws, (world, ws)
    B, A, T = args.micro, args.accum, cfg.train.seq_len

    record: dict[str, Any] = {
        "spec": spec,
        "strategy": strategy,
        "engine": engine.name,
        "world_size": world,
        "precision": cfg.precision.dtype,
        "created_bytes": everyone(created["bytes"], world),
        "num_params": engine.num_params,
    }
    # The initial weights (fp32 masters) against a single process's GPT(seed=run.seed).
    reference = GPT(model_cfg, seed=cfg.run.seed).state_dict()
    initial = full_tensors(engine.model_state_dict())
    record["init_max_diff"] = max(float((initial[k] - v).abs().max()) for k, v in reference.items())
    start = 0
    if load:
        template = engine.state_dict()
        ts = checkpoint.load(Path(load), template)
        engine.load_state_dict(template)
        start = ts["step"]
        record["loaded_state"] = full_tensors(engine.state_dict()) if args.dump else None

    losses, norms, memory = [], [], None
    background: checkpoint.Background | None = None
    all_reduces: list[int] = []
    t0 = time.perf_counter()
    for step in range(start, start + steps):
        x, y = global_batch(step, B * A * world, T)
        step_loss = torch.zeros(())
        for m in range(A):
            rows = slice(m * B * world + rank * B, m * B * world + rank * B + B)
            xb, yb = x[rows].to(engine.device), y[rows].to(engine.device)
            counter = AllReduceCounter() if world > 1 else None
            step_loss += engine.micro_step(xb, yb, m == A - 1).cpu() / A
            if counter is not None:
                counter.close()
                if step == start:
                    all_reduces.append(counter.calls)
        if step == start + steps - 1:
            memory = everyone(engine.memory_breakdown(), world)
        lr = lr_at(step, cfg.train.max_steps, cfg.optim.lr, cfg.schedule)
        norm = engine.optimizer_step(lr, cfg.optim.grad_clip)
        losses.append(float(engine.all_reduce_mean(step_loss.to(engine.device)).item()))
        norms.append(float(norm.float().item()))
        if save_at and step + 1 == save_at:
            state = engine.state_dict()
            train_state = {"step": step + 1, "world_size": world, "strategy": engine.name}
            path = checkpoint.save(
                Path(args.save) / strategy,
                step + 1,
                state,
                train_state,
                to_dict(cfg),  # type: ignore[arg-type]
                keep_last=2,
                native_saver=engine.save_native,
            )
            record["checkpoint"] = str(path)
            if args.dump:
                record["saved_state"] = full_tensors(state)
            # The same checkpoint written in the background: staged here, written while the
            # next steps change the weights (compared file by file with the one above).
            background = checkpoint.Background()
            staged = SimpleNamespace(step=step + 1, rng_state_dict=lambda: None)
            background.start(
                Path(args.save) / f"{strategy}-async", engine, staged, train_state,  # type: ignore[arg-type]
                to_dict(cfg), 2, lambda _: None,  # type: ignore[arg-type]
            )  # fmt: skip
    if background is not None:
        background.wait()
        native = getattr(engine, "_native_stagers", {})
        staged = background.stager.nbytes + sum(st.nbytes for st in native.values())
        record["staged_bytes"] = everyone(staged, world)
    # Full weights loaded into the wrapped model (Engine.load_model_weights), read back.
    other = GPT(model_cfg, seed=cfg.run.seed + 99).state_dict()
    engine.load_model_weights(other)
    back = full_tensors(engine.model_state_dict())
    record["load_weights_max_diff"] = max(
        float((back[k] - v).abs().max()) for k, v in other.items()
    )
    x, y = global_batch(0, B * world, T)
    rows = slice(rank * B, rank * B + B)
    val = engine.eval_loss(x[rows].to(engine.device), y[rows].to(engine.device))
    record["load_weights_loss"] = float(engine.all_reduce_mean(val).item())
    record.update(
        all_reduces_per_micro=all_reduces,
        losses=losses,
        grad_norms=norms,
        memory=memory,
        setup_s=setup_s,
        step_s=(time.perf_counter() - t0) / max(1, steps),
    )
    # Tear down so that the next strategy starts from a clean Accelerate/DeepSpeed state.
    del engine
    gc.collect()
    reset_accelerate_state()
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--strategies",
        required=True,
        help="comma-separated specs: name or name:key=value;key=value (overrides for that run)",
    )
    ap.add_argument("--out", required=True, help="JSON output (rank 0)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=20, help="schedule length")
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--save", default="", help="checkpoint root (one subdir per strategy)")
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument(
        "--load", default="", help="checkpoint directories to resume from, one per spec (comma)"
    )
    ap.add_argument("--dump", action="store_true", help="record full saved/loaded states")
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides")
    args = ap.parse_args()
    torch.set_num_threads(1)
    records = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        specs = args.strategies.split(",")
        loads = args.load.split(",") if args.load else [""] * len(specs)
        assert len(loads) == len(specs), "--load needs one checkpoint per spec"
        for spec, load in zip(specs, loads):
            records.append(run_one(args, spec, load))
    if dist.is_main():
        if args.dump:
            torch.save(records, args.out + ".pt")
            for r in records:
                r.pop("saved_state", None)
                r.pop("loaded_state", None)
        Path(args.out).write_text(json.dumps(records, indent=1))
    if dist.initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    os._exit(0)  # DeepSpeed leaves threads behind that can stall interpreter exit


if __name__ == "__main__":
    main()
