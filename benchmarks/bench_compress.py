"""Compression trade-offs of one trained model: size, quality and CPU speed, against fp32.

    python -m benchmarks.bench_compress                 # the BENCHMARKS.md table (hours on 2 cores)
    python -m benchmarks.bench_compress --quick         # a check: tiny model, minutes

1. Prepares `data/demo` if missing (the embedded stdlib corpus, vocab 2048).
2. Trains the model (skipped when `<work>/base` already finished): `small10m` (6 x 384, 6 heads,
   11.4M parameters with the tied 2048-token embedding) in Llama mode (RoPE, RMSNorm, SwiGLU,
   no biases, multi-head attention), --steps steps of 4096 tokens.
3. Compresses it with the real CLI, one output dir per variant: int8 weight-only, int8 dynamic,
   structured pruning of 25% and 50% of the heads and MLP neurons (uniform: they export to HF)
   with a recovery fine-tune of --finetune-steps steps, unstructured 50%.
4. Scores every model on the whole val split (`pretrain.eval`'s scoring, via each compress
   report: deterministic, the fp32 row of every report must agree), then times all of them in
   this one process, interleaved rounds, best of --rounds: greedy generation of 64 tokens
   (batch 1, KV cache) and a batched forward of 8 x 256 tokens (prefill / scoring throughput).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LLAMA = [
    "model.norm=rmsnorm", "model.mlp=swiglu", "model.pos_emb=rope", "model.bias=false",
]  # fmt: skip


def sh(args: list[str]) -> None:
    print("+ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=REPO)


def train_base(data: Path, run: Path, model: str, steps: int) -> None:
    from pretrain import checkpoint

    done = (run / "checkpoints").is_dir() and checkpoint.step_of(checkpoint.resolve(run)) == steps
    if done:
        print(f"# {run} already trained {steps} steps", flush=True)
        return
    sh(["-m", "pretrain.train", "experiment=demo", f"model={model}", *LLAMA,
        f"data.dir={data}", f"run.dir={run}", f"train.max_steps={steps}", "train.seq_len=256",
        "train.micro_batch=8", "train.global_batch_tokens=4096", "optim.lr=2e-3",
        f"schedule.warmup_steps={max(1, steps // 10)}", f"train.eval_every={max(1, steps // 4)}",
        "train.eval_batches=4", f"checkpoint.every={max(1, steps // 4)}", "logging.every=20",
        "logging.wandb=false"])  # fmt: skip


def variants(finetune_steps: int) -> dict[str, list[str]]:
    ft = ["--finetune-steps", str(finetune_steps), "--finetune", "logging.wandb=false"]
    return {
        "int8": ["--quantize", "int8"],
        "int8-dynamic": ["--quantize", "int8-dynamic"],
        "structured-25": ["--prune", "0.25", *ft],
        "structured-50": ["--prune", "0.5", *ft],
        "unstructured-50": ["--prune", "0.5", "--prune-method", "unstructured"],
    }


@torch.no_grad()
def prefill_tokens_per_s(model: torch.nn.Module, batch: torch.Tensor) -> float:
    model(batch[:1, :16])
    t0 = time.perf_counter()
    model(batch)
    return batch.numel() / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-compress")
    ap.add_argument("--model", default="small10m", help="model preset (conf/model)")
    ap.add_argument("--steps", type=int, default=400, help="training steps of 4096 tokens")
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 60 + 10 steps: a check")
    args = ap.parse_args()
    if args.quick:
        args.model, args.steps, args.finetune_steps, args.rounds = "tiny", 60, 10, 2
        args.work = args.work.with_name(args.work.name + "-quick")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data / "manifest.json").is_file():
        sh(["-m", "pretrain.prepare", f"output={args.data}", "tokenizer.vocab_size=2048"])
    base = args.work / "base"
    train_base(args.data, base, args.model, args.steps)

    threads = ["--threads", str(args.threads)] if args.threads else []
    for name, extra in variants(args.finetune_steps).items():
        out = args.work / name
        if (out / "report.json").is_file():
            print(f"# {out} exists: reusing it", flush=True)
            continue
        sh(["-m", "pretrain.compress", str(base), str(out), "--data", str(args.data),
            "--rounds", "1", *threads, *extra])  # fmt: skip

    # Quality from the reports (the same scoring of the same weights gives the same numbers in
    # any process); speed of every model measured here, interleaved.
    from pretrain.compress import cpu_summary, generation_tokens_per_s
    from pretrain.data.loader import TokenLoader
    from pretrain.pretrained import load_pretrained

    rows: list[dict] = []
    fp32 = None
    for name in variants(args.finetune_steps):
        report = json.loads((args.work / name / "report.json").read_text())
        stages = report["stages"]
        if fp32 is None:
            fp32 = dict(stages[0], name="fp32", path=str(base))
            rows.append(fp32)
        assert stages[0]["val_loss"] == fp32["val_loss"], "fp32 scored differently"
        paths = {1: args.work / name / "pruned", 2: args.work / name} if len(stages) == 3 else {}
        for i, s in enumerate(stages[1:], 1):
            path = paths.get(i, args.work / name)
            rows.append(dict(s, name=f"{name}: {s['name']}", path=str(path)))
    models = [load_pretrained(r["path"]).model for r in rows]
    eos = load_pretrained(base).tokenizer.eos_id  # type: ignore[union-attr]
    x, _ = next(iter(TokenLoader(args.data, "val", 256, 8, loop=True, partitions=None)))
    gen: list[list[float]] = [[] for _ in rows]
    pre: list[list[float]] = [[] for _ in rows]
    for _ in range(args.rounds):
        for i, m in enumerate(models):
            gen[i].append(generation_tokens_per_s(m, 64, eos))
            pre[i].append(prefill_tokens_per_s(m, x))
    for r, g, p in zip(rows, gen, pre):
        r["gen_tokens_per_s"], r["prefill_tokens_per_s"] = max(g), max(p)

    b = rows[0]
    import os

    print(f"\n# {cpu_summary()} {torch.get_num_threads()} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}. Val: {b['val_tokens']:,} tokens.")  # fmt: skip
    print(
        "| model | weights file | vs fp32 | parameters | non-zero | val loss | val ppl | "
        "ppl vs fp32 | bits/byte | generate tokens/s | vs fp32 | prefill tokens/s | vs fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['weights_bytes'] / 1e6:.2f} MB | "
            f"{r['weights_bytes'] / b['weights_bytes']:.3f} | {r['params'] / 1e6:.2f}M | "
            f"{r['nonzero_params'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | "
            f"{(r['val_ppl'] / b['val_ppl'] - 1) * 100:+.2f}% | {r['bits_per_byte']:.4f} | "
            f"{r['gen_tokens_per_s']:.1f} | {r['gen_tokens_per_s'] / b['gen_tokens_per_s']:.2f} | "
            f"{r['prefill_tokens_per_s']:,.0f} | "
            f"{r['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f} |"
        )
    (args.work / "bench.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
