"""Mixtures of sources in the token loader: throughput, building the blend, and the shares.

    python -m benchmarks.bench_mixture [--rounds 3] [--seq-len 1024] [--batch 8] [--tokens 16M]

Sources: the embedded corpus (the stdlib) cut into 8 disjoint sets of files, each prepared as
its own data dir with one tokenizer (trained on the first, `tokenizer.path=` for the others).

Throughput: tokens/s of TokenLoader per process, in-process (num_workers=0) and with one
DataLoader worker, reading `--tokens` tokens (loop=True) from 1 source, 2 (weights 0.7 / 0.3)
and 8 (weights 1 .. 8), data.partitions 256, best of `--rounds` interleaved rounds; the one
source row is the loader of a plain data dir (the baseline).

Blend: the time to build a mixture's tables (the interleave of 65,537 positions and the prefix
table), for 2 and 8 sources.

Shares: the largest deviation, in windows, of a source's count in one optimizer step from its
weight × the step's windows, over 1,000 steps of a global batch of 512 windows (e.g. 64 ranks x
micro-batch 8, or 8 x 8 x accumulation 8); and of any span of consecutive windows of those
512,000 from the blend's integer shares a_k / D (which differ from the weights by < 1 / D).
Counted from the source each window is read from (`Mixture.take`, what the readers are given).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.data import Source, TokenLoader, read_manifest
from pretrain.data.mixture import Mixture, Phase, blend_period, integer_weights
from pretrain.data.sources import resolve_inputs
from pretrain.prepare import PrepareConfig, TokenizerConfig, run_prepare

PARTITIONS = 256  # each of the 8 sources has ~1,000 windows of 1,025 tokens
MIXES = {1: [1.0], 2: [0.7, 0.3], 8: [float(k) for k in range(1, 9)]}


def prepare_sources(work: Path, vocab: int) -> list[Path]:
    files = resolve_inputs("stdlib")[0]
    dirs = []
    for k in range(8):
        tok = TokenizerConfig(vocab_size=vocab) if k == 0 else TokenizerConfig(path=str(dirs[0] / "tokenizer.model"))  # fmt: skip
        cfg = PrepareConfig(
            input=files[k::8], output=str(work / f"s{k}"), tokenizer=tok, num_proc=2
        )
        with contextlib.redirect_stdout(io.StringIO()):
            dirs.append(run_prepare(cfg))
    return dirs


def loader(dirs: list[Path], k: int, seq_len: int, batch: int, workers: int) -> TokenLoader:
    if k == 1:  # the plain loader of one data dir
        return TokenLoader(dirs[0], "train", seq_len, batch, num_workers=workers, partitions=PARTITIONS)  # fmt: skip
    sources = [Source(f"s{i}", read_manifest(dirs[i]), w) for i, w in enumerate(MIXES[k])]
    return TokenLoader(sources, "train", seq_len, batch, num_workers=workers, partitions=PARTITIONS)


def bench_throughput(
    dirs: list[Path], a: argparse.Namespace
) -> tuple[dict[tuple[int, int], float], dict[int, tuple[int, int, int]]]:
    """Best tokens/s per (sources, workers); per sources, in-process: (peak bytes of shards
    held, the bound, shard loads)."""
    best: dict[tuple[int, int], float] = {}
    memory: dict[int, tuple[int, int, int]] = {}
    batches = a.tokens // (a.batch * a.seq_len)
    for _ in range(a.rounds):
        for k in MIXES:
            for workers in (0, 1):
                ld = loader(dirs, k, a.seq_len, a.batch, workers)
                it = iter(ld)
                next(it)  # start-up (workers, first shards) is not throughput
                t, n = time.perf_counter(), 0
                for _, (x, _y) in zip(range(batches), it):
                    n += x.numel()
                rate = n / (time.perf_counter() - t)
                it.close()
                best[(k, workers)] = max(best.get((k, workers), 0.0), rate)
                if workers == 0:
                    r = ld._reader
                    loads = sum(s.loads for s in r.sources if s is not None)
                    memory[k] = (r.peak_bytes, ld.memory_bound_bytes(), loads)
    return best, memory


def bench_blend(rounds: int) -> dict[int, float]:
    out = {}
    for k in (2, 8):
        a = integer_weights(MIXES[k], blend_period(PARTITIONS))
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            Mixture([f"s{i}" for i in range(k)], [Phase(0, a, 1024)], PARTITIONS)
            times.append(time.perf_counter() - t)
        out[k] = min(times)
    return out


def bench_shares(k: int, step: int = 512, steps: int = 1000) -> tuple[float, float]:
    """(the largest |count - weight × step| of a source in a step, in windows; the largest
    deviation of any span of the steps' windows from the blend's shares a_k / D)."""
    D = blend_period(PARTITIONS)
    w = np.array(MIXES[k]) / sum(MIXES[k])
    a = integer_weights(MIXES[k], D)
    mix = Mixture([f"s{i}" for i in range(k)], [Phase(0, a, 1024)], PARTITIONS)
    src, _ = mix.take(np.arange(step * steps, dtype=np.int64))  # the source of each window
    per_step = np.stack([np.bincount(s, minlength=k) for s in src.reshape(steps, step)])
    c = np.vstack([np.zeros(k), np.cumsum(np.eye(k)[src], axis=0)])  # [n + 1, K]
    e = c - np.arange(len(c))[:, None] * np.array(a) / D
    return float(np.abs(per_step - w * step).max()), float((e.max(0) - e.min(0)).max())


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")  # fmt: skip
    flags = next((ln.split(":", 1)[1].split() for ln in lscpu.splitlines() if ln.startswith("Flags")), [])  # fmt: skip
    amx = [f for f in flags if f.startswith("amx")]
    return (
        f"{platform.machine()}, {model}, {os.cpu_count()} CPUs; avx512_bf16: "
        f"{'yes' if 'avx512_bf16' in flags else 'no'}, AMX: {', '.join(amx) or 'no'}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16 << 20, help="tokens read per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats; best is reported")
    a = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = prepare_sources(Path(tmp), a.vocab)
        tokens = [read_manifest(d).num_tokens["train"] for d in dirs]
        rates, memory = bench_throughput(dirs, a)
        blend = bench_blend(a.rounds)
    print(f"\nmachine: {machine()}; load average {load0:.1f} at start; best of {a.rounds} rounds")
    print(f"sources: 8 disjoint sets of stdlib files, {', '.join(f'{t:,}' for t in tokens)} train tokens; "  # fmt: skip
          f"vocab {a.vocab}; seq_len {a.seq_len}, batch {a.batch}, data.partitions {PARTITIONS}, "
          f"{a.tokens:,} tokens read per measurement\n")  # fmt: skip
    print(
        "| loader | tokens/s, num_workers=0 | vs 1 source | tokens/s, num_workers=1 | vs 1 source |"
    )
    print("|---|---:|---:|---:|---:|")
    for k in MIXES:
        name = "1 source (plain data dir, baseline)" if k == 1 else f"{k} sources, weights {'/'.join(f'{w:g}' for w in MIXES[k])}"  # fmt: skip
        r0, r1 = rates[(k, 0)], rates[(k, 1)]
        print(f"| {name} | {r0:,.0f} | {r0 / rates[(1, 0)]:.2f} | {r1:,.0f} | {r1 / rates[(1, 1)]:.2f} |")  # fmt: skip
    print("\n| in-process reader | peak bytes of shards held | bound | shard loads |")
    print("|---|---:|---:|---:|")
    for k, (peak, bound, loads) in memory.items():
        print(f"| {k} source{'s' if k > 1 else ''} | {peak:,} | {bound:,} | {loads} |")
    print(f"\nbuilding a mixture's tables (D = {blend_period(PARTITIONS):,}, P = {PARTITIONS}): "
          + ", ".join(f"{k} sources {t * 1000:.0f} ms" for k, t in blend.items()))  # fmt: skip
    print("\n| shares, 1,000 steps of 512 windows | largest deviation of a step from weight x 512 | largest deviation of any span from a_k / D |")  # fmt: skip
    print("|---|---:|---:|")
    for k in (2, 8):
        step, span = bench_shares(k)
        print(f"| {k} sources, weights {'/'.join(f'{w:g}' for w in MIXES[k])} | {step:.2f} windows | {span:.2f} windows |")  # fmt: skip


if __name__ == "__main__":
    main()
