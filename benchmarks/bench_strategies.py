"""Step time and per-rank memory of every strategy, side by side, at 2 ranks.

    python benchmarks/bench_strategies.py [--nproc 2] [--steps 6] [--strategies ddp,fsdp,...]
        [--set strategy.trim_heap_in_backward=false ...]   # config overrides for every job

Each strategy runs in its own `torchrun` job (so a process's peak RSS belongs to one
strategy) on the same ~20M-parameter GPT-2-style model and the same random batches. Reported
per rank (the max over ranks): the mean optimizer-step time after warm-up, tokens/s over all
ranks, the peak resident set size of the process, and the bytes of parameters, gradients,
optimizer state and fp32 master copies held by the rank, measured from the live tensors just
before an optimizer step (`Engine.memory_breakdown`). Ratios are against ddp measured in the
same run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ALL = ["ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_grad_op", "hsdp"]
# ~20M parameters: 8 blocks of width 384 (14.2M) + a 16384 x 384 tied embedding (6.3M).
MODEL = [
    "model.n_layer=8",
    "model.n_embd=384",
    "model.n_head=6",
    "model.vocab_size=16384",
    "model.block_size=256",
]


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pretrain import dist
    from pretrain.engine import create_engine
    from pretrain.model import GPTConfig
    from pretrain.optim import build_optimizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                "experiment=debug",
                f"strategy={args.strategy}",
                f"precision={args.precision}",
                f"train.micro_batch={args.micro}",
                f"train.seq_len={args.seq_len}",
                *MODEL,
                *args.set,
            ],
        )
    engine = create_engine(cfg, accum=1)  # type: ignore[arg-type]
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))  # type: ignore[arg-type]
    device = engine.device
    engine.build(model_cfg, lambda m: build_optimizer(m, cfg.optim, device))
    n_params = engine.num_params
    g = torch.Generator().manual_seed(engine.rank)
    times, mem = [], {}
    for step in range(args.steps):
        x = torch.randint(0, cfg.model.vocab_size, (args.micro, args.seq_len + 1), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        engine.micro_step(x[:, :-1].to(device), x[:, 1:].to(device), True)
        paused = 0.0
        if step == args.steps - 1:  # gradients are live now; the bookkeeping is not timed
            tm = time.perf_counter()
            mem = engine.memory_breakdown()
            paused = time.perf_counter() - tm
        engine.optimizer_step(1e-4, 1.0)
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0 - paused)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    mine = {"step_s": sum(times) / len(times), "rss": rss, **mem}
    everyone: list[Any] = [None] * engine.world_size
    torch.distributed.all_gather_object(everyone, mine)
    if dist.is_main():
        Path(args.out).write_text(
            json.dumps(
                {
                    "strategy": args.strategy,
                    "engine": engine.name,
                    "world_size": engine.world_size,
                    "params": n_params,
                    "ranks": everyone,
                }
            )
        )
    dist.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pretrain" / "torch_extensions")
    )
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies.split(","):
            out = Path(tmp) / f"{strategy}.json"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={29600 + len(results)}",
                __file__, "--worker", "--strategy", strategy, "--out", str(out),
                "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--micro", str(args.micro), "--seq-len", str(args.seq_len),
                "--precision", args.precision, *(f"--set={o}" for o in args.set),
            ]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0 or not out.exists():
                print(f"{strategy}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            rec = json.loads(out.read_text())
            rec["wall_s"] = time.perf_counter() - t0
            results.append(rec)
            print(f"{strategy}: done in {rec['wall_s']:.0f}s", file=sys.stderr, flush=True)
    return results


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def mb(b: float) -> str:
        return f"{b / 2**20:,.1f}"

    base = next((r for r in results if r["strategy"] == "ddp"), None)

    def worst(r: dict[str, Any], key: str) -> float:
        return max(rank.get(key, 0) for rank in r["ranks"])

    def total(r: dict[str, Any]) -> float:
        keys = ("params", "grads", "optim", "master", "master_grads")
        return max(sum(rank.get(k, 0) for k in keys) for rank in r["ranks"])

    tokens = args.micro * args.seq_len * args.nproc
    lines = [
        "| strategy | runs as | step (s) | tokens/s | vs ddp | peak RSS/rank (MiB) | vs ddp "
        "| params | grads | optim | master | tensors/rank (MiB) | vs ddp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        step = worst(r, "step_s")
        rss = worst(r, "rss")
        ten = total(r)
        ratio = (
            (
                f"{step / worst(base, 'step_s'):.2f}x",
                f"{rss / worst(base, 'rss'):.2f}x",
                f"{ten / total(base):.2f}x",
            )
            if base
            else ("", "", "")
        )
        master = worst(r, "master") + worst(r, "master_grads")
        lines.append(
            f"| {r['strategy']} | {r['engine']} | {step:.3f} | {tokens / step:,.0f} | {ratio[0]} "
            f"| {mb(rss)} | {ratio[1]} | {mb(worst(r, 'params'))} | {mb(worst(r, 'grads'))} "
            f"| {mb(worst(r, 'optim'))} | {mb(master)} | {mb(ten)} | {ratio[2]} |"
        )
    n = results[0]["params"] if results else 0
    head = (
        f"{n / 1e6:.1f}M-parameter GPT, {args.nproc} ranks on CPU (gloo), {args.precision}, "
        f"micro-batch {args.micro} x seq {args.seq_len} per rank, mean of {args.steps - args.warmup} "
        f"steps after {args.warmup} warm-up; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores. Memory columns are MiB per rank (max over ranks); "
        "master = DeepSpeed's separate fp32 weights and gradient partitions."
    )
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--strategies", default=",".join(ALL))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results = run_all(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results, args))


if __name__ == "__main__":
    main()
