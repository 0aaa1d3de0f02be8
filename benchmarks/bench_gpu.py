"""GPU training throughput and MFU of GPT-2 124M on one device (the `make gpu-check` figure).

    python -m benchmarks.bench_gpu [--micro 16] [--seq 1024] [--steps 30] [--warmup 10]

The training step is the project's own: the `experiment=gpt2-124m` config (bf16, torch.compile,
fused AdamW, gradient clipping), built by `create_engine` + `Engine.build` and stepped with
`micro_step` / `optimizer_step` exactly as `train()` does, on random token ids (a real
vocabulary of 50,257 padded to 50,304) so that no corpus is needed on the GPU machine. MFU
counts the model's FLOPs per token (`pretrain.flops.flops_per_token`, the PaLM formula with
attention) against the device's dense bf16 peak from `pretrain.flops.peak_flops`. The same run
also times a bare `torch.matmul` of 8192^3 in bf16 (the baseline: what this device gives any
code), so the ratio reads independently of the peak table.

Prints one JSON object per configuration, and a Markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def run(
    micro: int, seq: int, steps: int, warmup: int, compile_model: bool, device: str, model: str
) -> dict:
    from pretrain.engine import create_engine
    from pretrain.engine.process_group import reset_accelerate_state
    from pretrain.flops import flops_per_token, peak_flops
    from pretrain.model import GPTConfig
    from pretrain.optim import build_optimizer, lr_at

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                "experiment=gpt2-124m", "data.dir=unused", f"train.device={device}",
                f"model={model}",
                f"train.micro_batch={micro}", f"train.seq_len={seq}",
                "train.global_batch_tokens=0", f"train.compile={str(compile_model).lower()}",
                "model.vocab_size=50257",
            ],
        )  # fmt: skip
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))  # type: ignore[arg-type]
    engine = create_engine(cfg, accum=1)  # type: ignore[arg-type]
    engine.build(model_cfg, lambda m: build_optimizer(m, cfg.optim, engine.device))
    g = torch.Generator(device=device).manual_seed(0)

    def step(i: int) -> None:
        seqs = torch.randint(0, 50257, (micro, seq + 1), device=device, generator=g)
        engine.micro_step(seqs[:, :-1], seqs[:, 1:], last=True)
        engine.optimizer_step(lr_at(i, 10**6, cfg.optim.lr, cfg.schedule), cfg.optim.grad_clip)

    for i in range(warmup):  # compile, autotune, allocator warm-up
        step(i)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    elapsed = time.perf_counter() - t
    tokens_per_s = steps * micro * seq / elapsed
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_flops(name, "bf16")
    fpt = flops_per_token(model_cfg, seq)
    out = {
        "device": name,
        "model": model,
        "params": engine.num_params,
        "micro_batch": micro,
        "seq_len": seq,
        "compile": compile_model,
        "tokens_per_s": round(tokens_per_s),
        "step_ms": round(1000 * elapsed / steps, 2),
        "model_tflops": round(tokens_per_s * fpt / 1e12, 1),
        "mfu": round(tokens_per_s * fpt / peak, 4) if peak else None,
        "peak_tflops_table": peak / 1e12 if peak else None,
        "max_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if device == "cuda"
        else None,
    }
    reset_accelerate_state()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, nargs="+", default=[16])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    # A smoke run of this script's own code on a machine without a GPU (no figure for the
    # benchmarks): --device cpu --model debug --seq 64 --micro 2 --steps 2 --warmup 1.
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="gpt2-124m", help="a conf/model preset")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device visible")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    n = 8192 if args.device == "cuda" else 512
    baseline = matmul_tflops(args.device, n=n)
    print(json.dumps({"baseline": f"bf16 matmul {n}^3", "tflops": round(baseline, 3)}))
    for micro in args.micro:
        r = run(
            micro, args.seq, args.steps, args.warmup, not args.no_compile, args.device, args.model
        )
        r["vs_matmul"] = round(r["model_tflops"] / baseline, 3)
        print(json.dumps(r), flush=True)
        print(
            f"| {r['device']} | {args.model} | {micro} x {args.seq} | {r['tokens_per_s']:,} | "
            f"{r['model_tflops']} | {100 * (r['mfu'] or 0):.1f}% | {r['vs_matmul']:.2f} | "
            f"{r['max_mem_gb']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
