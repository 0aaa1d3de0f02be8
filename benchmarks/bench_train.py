"""Training throughput: `python -m pretrain.train` against a plain PyTorch loop over
Hugging Face's GPT2LMHeadModel of the same dimensions and batch, in the same run. With
`--host-mmap`: ours with `train.host_mmap_threshold_kib=64` (every freed host block of 64 KiB or
more goes back to the OS) against the default (glibc's own threshold), alternating, `--repeats`
times each.

    python -m benchmarks.bench_train --data data/demo [--models tiny small10m] [--steps 40]
    python -m benchmarks.bench_train --host-mmap [--repeats 3]   # what returning host memory costs

Both sides: fp32, the same micro-batch and sequence length, AdamW, one process using every
core. Ours is the real CLI (data loading, logging, checkpointing off by cadence included);
its tokens/s is the mean over logged intervals after the first (warm-up) one. The baseline
feeds random token ids (no data loading at all), so the ratio is conservative for us.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pretrain.flops import flops_per_token, measure_matmul_flops
from pretrain.model import GPTConfig

REPO = Path(__file__).resolve().parents[1]


def preset(name: str, vocab: int) -> GPTConfig:
    raw = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()) or {}
    cfg = GPTConfig(**raw)
    cfg.vocab_size = vocab
    return cfg


def ours(data: Path, model: str, micro: int, seq: int, steps: int, *extra: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "pretrain.train", "experiment=demo", f"model={model}",
            f"data.dir={data}", f"run.dir={tmp}/run", f"train.max_steps={steps}",
            f"train.micro_batch={micro}", f"train.seq_len={seq}", "train.global_batch_tokens=0",
            "train.eval_every=0", "train.eval_batches=0", "logging.wandb=false",
            "logging.every=5", f"checkpoint.every={10 * steps}", "model.dropout=0.0",
            "data.num_workers=1", *extra,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
        rows = [
            json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
        return sum(tps) / len(tps)


def hf_baseline(cfg: GPTConfig, micro: int, seq: int, steps: int) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=cfg.padded_vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randint(0, cfg.vocab_size, (micro, seq))
    warm = max(2, steps // 8)
    for i in range(steps):
        if i == warm:
            t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - warm) * micro * seq / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--models", nargs="+", default=["tiny", "small10m"])
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--host-mmap", action="store_true", help="the mmap threshold's cost")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    vocab = json.loads((Path(args.data) / "manifest.json").read_text())["vocab_size"]
    if args.host_mmap:
        host_mmap(args, vocab)
        return
    peak = measure_matmul_flops()
    print(
        f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)"
    )
    print(
        "| model | params | ours tok/s | HF GPT2LMHeadModel tok/s | ratio | ours FLOP/s / matmul peak |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.models:
        cfg = preset(name, vocab)
        seq = min(args.seq, cfg.block_size)
        a = ours(Path(args.data), name, args.micro, seq, args.steps)
        b = hf_baseline(cfg, args.micro, seq, args.steps)
        fpt = flops_per_token(cfg, seq)
        from pretrain.model import GPT

        n = GPT(cfg).num_params()
        print(
            f"| {name} | {n / 1e6:.1f}M | {a:,.0f} | {b:,.0f} | {a / b:.2f}x | "
            f"{a * fpt / peak:.0%} |",
            flush=True,
        )


def host_mmap(args: argparse.Namespace, vocab: int) -> None:
    """tokens/s with freed host blocks returned at once, and with glibc's own threshold."""
    print("| model | host_mmap_threshold_kib=64 tok/s (runs) | default tok/s (runs) | ratio |")
    print("|---|---|---|---|")
    for name in args.models:
        seq = min(args.seq, preset(name, vocab).block_size)
        on: list[float] = []
        off: list[float] = []
        for _ in range(args.repeats):  # alternating: drift on the machine hits both alike
            on.append(
                ours(Path(args.data), name, args.micro, seq, args.steps,
                     "train.host_mmap_threshold_kib=64")
            )  # fmt: skip
            off.append(ours(Path(args.data), name, args.micro, seq, args.steps))
        a, b = sum(on) / len(on), sum(off) / len(off)
        runs = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
        print(f"| {name} | {a:,.0f} ({runs(on)}) | {b:,.0f} ({runs(off)}) | {a / b:.3f} |")


if __name__ == "__main__":
    main()
