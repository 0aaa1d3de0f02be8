"""Measure per-rank model-state memory of the real strategies, for test_plan_memory.py.

Run under torchrun (gloo, CPU): `plan_worker.py OUT [strategy:precision,...]`. For each case,
in sequence in the same processes: build a small GPT (~3.3M parameters), wrap it with
`pretrain.engine.create_engine` + `build` (the training loop's own code; ZeRO with
strategy.fallback=error, so DeepSpeed really runs), train one optimizer step (so AdamW's state
exists), run the micro-batch(es) of the next step so the gradients exist (the peak of
model-state memory, just before the optimizer step), then add up the bytes of the tensors each
category really owns, each storage counted once:

    params  local parameter storage: DTensor local shards (FSDP2), DeepSpeed's flat 16-bit
            buffer (ZeRO-1/2), partitions `ds_tensor` plus any whole parameter (ZeRO-3)
    grads   `p.grad` (local shards for FSDP2), DeepSpeed's gradient partitions
            (`averaged_gradients`, `grads_in_partition`, `grad_partitions_flat_buffer`)
    optim   optimizer state tensors, plus DeepSpeed's fp32 master partition
            (`single_partition_of_fp32_groups` / `fp32_partitioned_groups_flat`) and, with
            offload, its gradient

and, for ddp, the gradient buckets its reducer all-reduces (seen by a communication hook).
This walks the tensors itself rather than trusting `Engine.memory_breakdown`. ZeRO-1 is
measured between the micro-batches of an accumulation of 2, where it holds whole gradients.
Each rank writes one JSON line per case to OUT.rank<r>.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pretrain import dist  # noqa: E402
from pretrain.model import GPTConfig  # noqa: E402

MODEL: dict[str, Any] = dict(vocab_size=512, n_layer=4, n_head=4, n_embd=256, block_size=64)
MICRO_BATCH, SEQ_LEN = 2, 64
HSDP_REPLICAS = 2  # two "nodes" of one rank each: shard group of 1, replicated twice
CASES = (
    "ddp:bf16",
    "fsdp:bf16",
    "fsdp_grad_op:bf16",
    "hsdp:bf16",
    "zero1:bf16",
    "zero2:bf16",
    "zero2:fp32",
    "zero3:bf16",
    "zero3_offload:bf16",
)


class Storages:
    """Bytes of distinct storages, each counted once, in the first category that claims it."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensors: Iterable[torch.Tensor | None]) -> None:
        total = self.bytes.setdefault(category, 0)
        for t in tensors:
            if t is None:
                continue
            if hasattr(t, "to_local"):  # DTensor: this rank's shard
                t = t.to_local()
            if t.device.type == "meta" or t.numel() == 0:
                continue
            st = t.untyped_storage()
            if st.data_ptr() in self.seen:
                continue
            self.seen.add(st.data_ptr())
            total += st.nbytes()
        self.bytes[category] = total


def flat(x: Any) -> Iterable[torch.Tensor]:
    """Every tensor in nested lists/tuples/dicts."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from flat(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from flat(v)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, SEQ_LEN))
    return x, torch.roll(x, -1, dims=1)


def measure(engine: Any, strategy: str) -> dict[str, int]:
    s = Storages()
    params = list(engine.raw_model.parameters())
    if strategy.startswith("zero"):
        zero = engine.zero  # DeepSpeedZeroOptimizer(_Stage3)
        s.add("params", (getattr(p, "ds_tensor", None) for p in params))
        s.add("params", params)  # ZeRO-1/2: views of the flat 16-bit buffer; ZeRO-3: empty
        s.add("grads", (p.grad for p in params))
        s.add("grads", flat(getattr(zero, "averaged_gradients", None)))
        s.add("grads", flat(getattr(zero, "grads_in_partition", None)))
        s.add("grads", flat(getattr(zero, "grad_partitions_flat_buffer", None)))
        s.add("grads", flat(getattr(zero, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)))  # fmt: skip
        masters = list(flat(getattr(zero, "fp32_partitioned_groups_flat", None)))
        masters += list(flat(getattr(zero, "single_partition_of_fp32_groups", None)))
        s.add("optim", masters)
        s.add("optim", (m.grad for m in masters))  # the offloaded fp32 gradient partition
    else:
        s.add("params", params)
        s.add("grads", (p.grad for p in params))
    s.add("optim", (t for st in engine.optimizer.state.values() for t in flat(st)))
    return dict(s.bytes)


def run_case(case: str) -> dict[str, Any]:
    # Imported here: the test imports this module for its constants only.
    from hydra import compose

    from pretrain.engine import create_engine
    from pretrain.optim import build_optimizer

    strategy, precision = case.split(":")
    overrides = [
        "experiment=debug",
        f"strategy={strategy}",
        f"precision={precision}",
        "strategy.fallback=error",
        f"strategy.hsdp_replicas={HSDP_REPLICAS if strategy == 'hsdp' else 0}",
        f"train.micro_batch={MICRO_BATCH}",
        f"train.seq_len={SEQ_LEN}",
        "train.device=cpu",
        "dist.timeout_s=120",
    ]
    cfg = compose(config_name="config", overrides=overrides)
    accum = 2 if strategy == "zero1" else 1
    engine = create_engine(cfg, accum=accum)  # type: ignore[arg-type]
    assert engine.name == strategy, f"asked for {strategy}, the engine runs {engine.name}"
    device = engine.device
    engine.build(GPTConfig(**MODEL), lambda m: build_optimizer(m, cfg.optim, device))
    buckets: dict[int, int] = {}
    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # No annotations: DDP checks them literally, and this module's are strings.
        def hook(state, bucket):  # type: ignore[no-untyped-def]
            st = bucket.buffer().untyped_storage()
            buckets[st.data_ptr()] = st.nbytes()
            return default_hooks.allreduce_hook(state, bucket)

        engine.model.register_comm_hook(None, hook)  # type: ignore[operator]
    for m in range(accum):  # one full optimizer step: AdamW's state now exists
        engine.micro_step(*batch(), last=m == accum - 1)
    engine.optimizer_step(1e-3, 1.0)
    buckets.clear()  # DDP rebuilds its buckets after the first step: count the live ones
    engine.micro_step(*batch(), last=accum == 1)  # next step's first micro-batch
    measured = measure(engine, strategy)
    if strategy == "ddp":
        measured["ddp_buckets"] = sum(buckets.values())
    if accum > 1:
        engine.micro_step(*batch(), last=True)
    engine.optimizer_step(1e-3, 1.0)
    # Tear down so that the next strategy starts from a clean Accelerate/DeepSpeed state.
    del engine
    gc.collect()
    from pretrain.engine.process_group import reset_accelerate_state

    reset_accelerate_state()
    return {"case": case, "rank": dist.rank(), "measured": measured}


def main() -> None:
    from hydra import initialize_config_dir

    out = sys.argv[1]
    cases = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    torch.set_num_threads(1)
    lines = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for case in cases:
            t0 = time.perf_counter()
            line = run_case(case)
            line["seconds"] = round(time.perf_counter() - t0, 2)
            lines.append(line)
    Path(f"{out}.rank{dist.rank()}").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if dist.initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    os._exit(0)  # DeepSpeed leaves threads behind that can stall interpreter exit


if __name__ == "__main__":
    main()
