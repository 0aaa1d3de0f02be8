"""Optimizer step time: torch's AdamW against ours (`pretrain.optim.AdamWL1`) with the L1 step
off and on, over the parameters of a model preset, in the same run.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_optim [--model tiny] [--steps 50] [--rounds 7]

Gradients are random (fixed seed) and set once; only `optimizer.step()` is timed, best of
`--rounds` interleaved rounds of `--steps` steps each, so the three variants see the same
machine state; wall time and this process's CPU time (the steadier figure on a shared
machine; OMP_NUM_THREADS=1 makes it one core's work). The L1 step is an elementwise pass over
the weight-decay group (a clamp and a subtraction per element), so its cost should be a
fraction of AdamW's own elementwise work.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from pretrain.model import GPT, GPTConfig
from pretrain.optim import AdamWL1, param_groups

REPO = Path(__file__).resolve().parents[1]


def model_of(name: str, vocab: int) -> GPT:
    raw = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()) or {}
    cfg = GPTConfig(**raw)
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return model


def time_steps(opt: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per step."""
    opt.step()  # warm-up: creates the state
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    model = model_of(args.model, args.vocab)
    n = sum(p.numel() for p in model.parameters())
    kw = {"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8}
    variants: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "torch AdamW (baseline)": lambda: torch.optim.AdamW(param_groups(model, 0.1), **kw),
        "AdamWL1, l1=0": lambda: AdamWL1(param_groups(model, 0.1, l1=0.0), **kw),
        "AdamWL1, l1=1e-3": lambda: AdamWL1(param_groups(model, 0.1, l1=1e-3), **kw),
    }
    wall = dict.fromkeys(variants, float("inf"))
    cpu = dict.fromkeys(variants, float("inf"))
    for _ in range(args.rounds):
        for name, make in variants.items():
            w, c = time_steps(make(), args.steps)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    base, base_cpu = wall["torch AdamW (baseline)"], cpu["torch AdamW (baseline)"]
    print(
        f"model {args.model} ({n / 1e6:.1f}M parameters), {torch.get_num_threads()} threads, "
        f"best of {args.rounds} rounds x {args.steps} steps"
    )
    print("| optimizer | ms/step (wall) | vs baseline | CPU ms/step | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        w, c = wall[name], cpu[name]
        print(f"| {name} | {1000 * w:.2f} | {w / base:.2f} | {1000 * c:.2f} | {c / base_cpu:.2f} |")


if __name__ == "__main__":
    main()
