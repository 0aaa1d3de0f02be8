"""Data pipeline throughput and memory, each against a baseline measured in the same run.

    python -m benchmarks.bench_data [--files N] [--seq-len 1024] [--batch 8]

Prepare: tokens/s of `run_prepare` (read, validate, tokenize, shard, hash, write) on the embedded
corpus (the stdlib) with 1 and 2 processes and a given tokenizer, against sentencepiece's raw
single-thread `encode` over the same documents already in memory. Parallel efficiency =
(tokens/s with 2 processes / 2) / raw single-thread tokens/s.

Loader: tokens/s of one pass of TokenLoader (in-process, and with 2 DataLoader workers) from the
local shards, with its sha256 check of every shard read and without it (the cost of the check),
against nanoGPT's reader: random windows of a flat uint16 np.memmap of the same train tokens,
`torch.from_numpy(...astype(np.int64))`, the same batch shape and token count.

Loader memory: the peak bytes of shards a reader holds (measured from its live arrays over one
pass) against the bound in `pretrain.data.loader`'s docstring, for 1 and 8 ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from pretrain.data import TokenLoader, read_manifest
from pretrain.data.shards import read_shard
from pretrain.data.sources import Skips, iter_unit_docs, make_units, resolve_inputs, training_sample
from pretrain.prepare import PrepareConfig, TokenizerConfig, run_prepare
from pretrain.tokenizer import train_tokenizer


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the prepare pool's workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


_SP: spm.SentencePieceProcessor | None = None


def _raw_init(model: str) -> None:
    global _SP
    _SP = spm.SentencePieceProcessor(model_file=model)


def _raw_encode(docs: list[str]) -> int:
    assert _SP is not None
    return sum(len(_SP.encode(d)) + 1 for d in docs)


def _docs(units: list) -> list[str]:
    out = []
    for unit in units:
        for doc, _, _ in iter_unit_docs(unit):
            if doc is not None:
                out.append(doc.text)
    return out


def bench_prepare(
    work: Path, files: list[str], vocab: int, rounds: int
) -> tuple[dict[str, float], Path]:
    corpus = work / "corpus"
    corpus.mkdir()
    for i, f in enumerate(files):  # the same files, in a flat dir, so a glob names exactly them
        os.symlink(f, corpus / f"{i:05d}.py")
    units = make_units(resolve_inputs(str(corpus / "*.py"))[0])
    cfg = PrepareConfig(
        input=str(corpus / "*.py"), output="", tokenizer=TokenizerConfig(vocab_size=vocab)
    )
    t = time.perf_counter()
    sample = training_sample(units, cfg.tokenizer.sample_bytes, 4096, 0, Skips())
    model = train_tokenizer(sample, vocab, work / "tok.model")
    t_train = time.perf_counter() - t

    docs = _docs(units)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    raw_tokens = sum(len(sp.encode(d)) + 1 for d in docs)  # warm-up, and the exact count
    res: dict[str, float] = {
        "train_s": t_train,
        "tokens": raw_tokens,
        "raw": 0.0,
        "p1": 0.0,
        "p2": 0.0,
    }
    out = work / "p1"
    # Interleaved rounds, best of each: on a shared machine the best is the least disturbed.
    for r in range(rounds):
        t, c = time.perf_counter(), _cpu()
        n = sum(len(sp.encode(d)) + 1 for d in docs)
        res["raw"] = max(res["raw"], n / (time.perf_counter() - t))
        res["raw_cpu"] = max(res.get("raw_cpu", 0.0), n / (_cpu() - c))
        # The machine's own ceiling: the same encode split over 2 independent processes.
        with mp.get_context("fork").Pool(2, _raw_init, (str(model),)) as pool:
            t = time.perf_counter()
            n = sum(pool.map(_raw_encode, [docs[0::2], docs[1::2]]))
            res["raw2"] = max(res.get("raw2", 0.0), n / (time.perf_counter() - t))
        for n_proc in (1, 2):
            out = work / f"r{r}-p{n_proc}"
            cfg = PrepareConfig(
                input=str(corpus / "*.py"),
                output=str(out),
                tokenizer=TokenizerConfig(path=str(model)),
                num_proc=n_proc,
            )
            t, c = time.perf_counter(), _cpu()
            with contextlib.redirect_stdout(io.StringIO()):
                run_prepare(cfg)
            dt = time.perf_counter() - t
            assert read_manifest(out).raw["num_tokens"] == raw_tokens
            res[f"p{n_proc}"] = max(res[f"p{n_proc}"], raw_tokens / dt)
            key = f"p{n_proc}_cpu"
            res[key] = max(res.get(key, 0.0), raw_tokens / (_cpu() - c))
    return res, out


def bench_loader(data: Path, seq_len: int, batch: int, rounds: int) -> dict[str, float]:
    m = read_manifest(data)
    # nanoGPT's reader over the same tokens: one flat uint16 file, random windows.
    flat = data / "train.bin"
    with open(flat, "wb") as f:
        for shard in m.shards("train"):
            for tokens, _ in read_shard(m, shard):
                f.write(tokens.tobytes())
    variants = [(w, h) for w in (0, 2) for h in (True, False)]
    for _ in TokenLoader(data, "train", seq_len, batch, loop=False):
        pass  # warm-up: the page cache and the imports, for whichever variant comes first
    res: dict[str, float] = {"memmap": 0.0} | {
        f"loader{w}{'' if h else '-nohash'}": 0.0 for w, h in variants
    }
    for _ in range(rounds):
        for workers, hashed in variants:
            loader = TokenLoader(data, "train", seq_len, batch, num_workers=workers, loop=False)
            loader._spec.hash_reads = hashed  # off only here: to measure what the check costs
            t, n = time.perf_counter(), 0
            for x, _y in loader:
                n += x.numel()
            key = f"loader{workers}{'' if hashed else '-nohash'}"
            res[key] = max(res[key], n / (time.perf_counter() - t))
            res["tokens"] = n
        n_batches = int(res["tokens"]) // (batch * seq_len)
        t = time.perf_counter()
        for _ in range(n_batches):
            arr = np.memmap(flat, dtype=np.uint16, mode="r")  # recreated per batch, as nanoGPT does
            ix = torch.randint(len(arr) - seq_len - 1, (batch,))
            x = torch.stack([torch.from_numpy(arr[i : i + seq_len].astype(np.int64)) for i in ix])
            y = torch.stack(
                [torch.from_numpy(arr[i + 1 : i + 1 + seq_len].astype(np.int64)) for i in ix]
            )
            del x, y
        res["memmap"] = max(res["memmap"], n_batches * batch * seq_len / (time.perf_counter() - t))
    return res


def bench_memory(data: Path, small: Path, seq_len: int, batch: int) -> list[dict[str, float]]:
    """The reader's measured peak against the bound, one in-process pass of rank 0 per world
    size, on a copy of the data with small shards (so that the bound, not the number of
    shards, limits what a reader holds)."""
    m = read_manifest(data)
    cfg = PrepareConfig(input=m.raw["inputs"]["roots"], output=str(small), shard_tokens=1 << 15,
                        tokenizer=TokenizerConfig(path=str(data / m.tokenizer)), num_proc=2)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        run_prepare(cfg)
    rows = []
    for world in (1, 8, 64, 256):
        loader = TokenLoader(small, "train", seq_len, batch, world_size=world, loop=False)
        for _ in loader:
            pass
        reader = loader._reader
        rows.append(
            {
                "world": world,
                "partitions": loader.partitions,
                "shards": len(loader.manifest.shards("train")),
                "peak_shards": reader.peak_shards,
                "peak_bytes": reader.peak_bytes,
                "bound": loader.memory_bound_bytes(),
                "max_shard_bytes": max(s.bytes for s in loader.manifest.shards("train")),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=0, help="use the first N stdlib files (0: all)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats; best is reported")
    ap.add_argument("--loader-only", action="store_true", help="prepare once, measure the loader")
    a = ap.parse_args()
    torch.set_num_threads(1)
    files = resolve_inputs("stdlib")[0]
    files = files[: a.files] if a.files else files
    with tempfile.TemporaryDirectory() as tmp:
        load0 = os.getloadavg()[0]
        if a.loader_only:
            data = Path(tmp) / "data"
            cfg = PrepareConfig(input=files, output=str(data), tokenizer=TokenizerConfig(vocab_size=a.vocab), num_proc=2)  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):
                run_prepare(cfg)
        else:
            p, data = bench_prepare(Path(tmp), files, a.vocab, a.rounds)
        ld = bench_loader(data, a.seq_len, a.batch, a.rounds)
        mem = bench_memory(data, Path(tmp) / "small-shards", a.seq_len, a.batch)
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load0:.1f} at "
        f"start; best of {a.rounds} rounds; {len(files)} stdlib files, vocab {a.vocab}\n"
    )
    if not a.loader_only:
        print_prepare(p)
    print_loader(a, ld, mem)


def print_prepare(p: dict[str, float]) -> None:
    eff, eff_cpu = p["p2"] / 2 / p["raw"], p["p2_cpu"] / p["raw_cpu"]
    print(f"{p['tokens']:,} tokens (tokenizer trained in {p['train_s']:.1f}s)\n")
    print("| prepare | tokens/s (wall) | vs baseline | tokens per CPU-second | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    rows = [("sentencepiece encode, 1 thread (baseline)", p["raw"], p["raw_cpu"])]
    rows += [("sentencepiece encode, 2 processes (machine ceiling)", p["raw2"], float("nan"))]
    rows += [(f"prepare, num_proc={n}", p[f"p{n}"], p[f"p{n}_cpu"]) for n in (1, 2)]
    for name, wall, cpu in rows:
        cpu_cols = "– | –" if cpu != cpu else f"{cpu:,.0f} | {cpu / p['raw_cpu']:.2f}"  # nan: n/a
        print(f"| {name} | {wall:,.0f} | {wall / p['raw']:.2f} | {cpu_cols} |")
    print(
        f"\nprepare parallel efficiency (tokens/s at num_proc=2) / 2 / (raw single-thread): "
        f"{eff:.0%} wall-clock ({p['p2'] / p['raw2']:.0%} of what 2 bare encode processes reach "
        f"on this machine in the same run); {eff_cpu:.0%} in CPU time\n"
    )


def print_loader(a: argparse.Namespace, ld: dict[str, float], mem: list[dict[str, float]]) -> None:
    print("| loader | tokens/s | vs baseline |")
    print("|---|---:|---:|")
    for name, key in [
        ("np.memmap random windows (nanoGPT, baseline)", "memmap"),
        ("TokenLoader, in-process (num_workers=0)", "loader0"),
        ("TokenLoader, in-process, without the sha256 check", "loader0-nohash"),
        ("TokenLoader, num_workers=2", "loader2"),
        ("TokenLoader, num_workers=2, without the sha256 check", "loader2-nohash"),
    ]:
        print(f"| {name} | {ld[key]:,.0f} | {ld[key] / ld['memmap']:.2f} |")
    cost = {w: 1 - ld[f"loader{w}"] / ld[f"loader{w}-nohash"] for w in (0, 2)}
    print(
        f"\nloader: seq_len {a.seq_len}, batch {a.batch}, {int(ld['tokens']):,} tokens per pass; "
        f"cost of the sha256 check of every shard read: {cost[0]:.1%} in-process, "
        f"{cost[2]:.1%} with 2 workers\n"
    )
    print(
        "| loader memory | partitions | shards | peak shards held | peak bytes held | bound | peak / bound |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in mem:
        print(
            f"| rank 0 of {r['world']}, in-process | {r['partitions']} | {r['shards']} | "
            f"{r['peak_shards']} | {r['peak_bytes']:,} | {r['bound']:,} | "
            f"{r['peak_bytes'] / r['bound']:.2f} |"
        )
    print(
        f"\nshards of <= 32,768 tokens (largest {mem[0]['max_shard_bytes']:,} bytes on disk); "
        f"bound = min(shards, 2 x partitions / ranks + 1) x (largest shard's tokens x 2 bytes + "
        f"8 bytes per window)"
    )


if __name__ == "__main__":
    main()
