"""Cleaning in prepare: throughput with each stage on and off, MinHash against rensa used
directly, near-duplicate recall and precision, what each quality rule removes.

    python -m benchmarks.bench_clean [--rounds 2]

Prepare: the embedded corpus (the standard library), one sentencepiece tokenizer (trained once,
then given as tokenizer.path so no row trains one), num_proc=2, best of `--rounds` interleaved
rounds; tokens/s of the tokens written. The rows: every stage off (the baseline), exact dedup
(the default), near dedup, quality rules, PII redaction, decontamination against the shipped
pyline task, all together.

MinHash: signatures of the corpus's documents (112 values, word 5-grams): rensa's RMinHash fed
the shingles already built (the library alone), against `pretrain.data.clean.dedup.signature`
(shingling, sketch, bytes): documents/s, best of 3.

Recall and precision: corpora of 250 distinct standard-library files (no two with a 5-gram
Jaccard >= 0.5) plus 40 exact copies, 40 near copies with 1%, 2%, 3% or 5% of their words
replaced, and 10 junk documents, prepared with clean.dedup=near; recall = near copies removed /
40, precision = near_duplicate removals that are planted near copies / all such removals.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks.bench_data import _docs
from pretrain.data.clean import CleanConfig, Dedup, Pii, Switch
from pretrain.data.clean.dedup import Deduper, exact_key, shingles, signature
from pretrain.data.sources import STDLIB, make_units, resolve_inputs
from pretrain.prepare import PrepareConfig, TokenizerConfig, run_prepare
from tests.planted_corpus import make_planted

STAGES = {
    "every stage off (baseline)": CleanConfig(dedup=Dedup.off),
    "dedup=exact (default)": CleanConfig(),
    "dedup=near": CleanConfig(dedup=Dedup.near),
    "quality=on": CleanConfig(dedup=Dedup.off, quality=Switch.on),
    "pii=redact": CleanConfig(dedup=Dedup.off, pii=Pii.redact),
    "exclude=[pyline]": CleanConfig(dedup=Dedup.off, exclude=["pyline"]),
    "all (near, quality, pii, exclude)": CleanConfig(
        dedup=Dedup.near, quality=Switch.on, pii=Pii.redact, exclude=["pyline"]
    ),
}


def quiet_prepare(cfg: PrepareConfig) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = run_prepare(cfg)
    dt = time.perf_counter() - t0
    return dt, json.loads((out / "manifest.json").read_text())


def bench_prepare(work: Path, rounds: int) -> dict[str, tuple[float, dict]]:
    tok = work / "tok"
    quiet_prepare(PrepareConfig(output=str(tok), clean=CleanConfig(dedup=Dedup.off)))
    best: dict[str, tuple[float, dict]] = {}
    for r in range(rounds):
        for name, clean in STAGES.items():
            cfg = PrepareConfig(
                output=str(work / f"out{r}-{len(best) % len(STAGES)}-{hash(name) & 0xFFFF}"),
                tokenizer=TokenizerConfig(path=str(tok / "tokenizer.model")),
                num_proc=2, clean=clean, overwrite=True,
            )  # fmt: skip
            dt, manifest = quiet_prepare(cfg)
            if name not in best or dt < best[name][0]:
                best[name] = (dt, manifest)
    return best


def bench_minhash(docs: list[str]) -> tuple[float, float]:
    from rensa import RMinHash

    built = [shingles(d, 5) for d in docs]
    lib = ours = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for s in built:
            m = RMinHash(num_perm=112, seed=1)
            m.update(s)
            m.digest()
        lib = min(lib, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for d in docs:
            signature(d, 5, 112, 1)
        ours = min(ours, time.perf_counter() - t0)
    return len(docs) / lib, len(docs) / ours


def dedup_memory(docs: list[str]) -> float:
    """Bytes per kept document of the main process's near-dedup state (tracemalloc)."""
    sigs = [signature(d, 5, 112, 1) for d in docs]
    tracemalloc.start()
    dedup = Deduper(near=True)
    kept = 0
    for i, (d, s) in enumerate(zip(docs, sigs)):
        kept += dedup.check(i, exact_key(d), s) is None
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / max(kept, 1)


def recall_precision(work: Path, share: float) -> tuple[float, float, int]:
    planted = make_planted(work / f"planted-{share}", near_share=share)
    clean = CleanConfig(dedup=Dedup.near, report_samples=10_000)
    cfg = PrepareConfig(
        input=str(planted.path), output=str(work / f"planted-out-{share}"),
        tokenizer=TokenizerConfig(vocab_size=512), clean=clean, num_proc=2,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = run_prepare(cfg)
    kind = dict(zip(planted.keys, planted.kinds))
    removed = [
        json.loads(line)
        for line in (out / "clean_report.jsonl").read_text().splitlines()
        if '"near_duplicate"' in line
    ]
    true = sum(kind[s["input"]] == "near" for s in removed)
    return true / 40, true / max(len(removed), 1), len(removed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; avx512_bf16: "
        f"{'yes' if 'avx512_bf16' in flags else 'no'}, AMX: {'yes' if 'amx' in flags else 'no'}; "
        f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} at start"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        best = bench_prepare(work, args.rounds)
        base = best["every stage off (baseline)"]
        base_tps = base[1]["num_tokens"] / base[0]
        print(
            "\n| prepare, num_proc=2 | documents kept | tokens kept | seconds | tokens/s | vs baseline |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for name, (dt, m) in best.items():
            tps = m["num_tokens"] / dt
            print(f"| {name} | {m['num_documents']:,} | {m['num_tokens']:,} | {dt:.2f} | {tps:,.0f} | {tps / base_tps:.2f} |")  # fmt: skip
        total_docs = base[1]["num_documents"]
        total_tokens = base[1]["num_tokens"]
        print(
            "\n| rule (on the standard library) | documents removed or changed | share | tokens | share |"
        )
        print("|---|---:|---:|---:|---:|")
        for name in ("dedup=near", "quality=on", "pii=redact", "exclude=[pyline]"):
            for rule, e in best[name][1]["clean"]["rules"].items():
                print(f"| {rule} | {e['documents']:,} | {e['documents'] / total_docs:.2%} | {e['tokens']:,} | {e['tokens'] / total_tokens:.2%} |")  # fmt: skip
        docs = [d for d in _docs(make_units(resolve_inputs(STDLIB)[0]))]
        lib, ours = bench_minhash(docs)
        print(f"\nMinHash over {len(docs):,} documents: rensa alone {lib:,.0f} docs/s, "
              f"signature() with shingling {ours:,.0f} docs/s ({ours / lib:.2f} x)")  # fmt: skip
        print(f"near-dedup state: {dedup_memory(docs):,.0f} bytes per kept document")
        print("\n| near copies, words replaced | recall | precision | near_duplicate removals |")
        print("|---|---:|---:|---:|")
        for share in (0.01, 0.02, 0.03, 0.05):
            r, p, n = recall_precision(work, share)
            prec = f"{p:.3f}" if n else "n/a (none removed)"
            print(f"| {share:.0%} | {r:.3f} | {prec} | {n} |")


if __name__ == "__main__":
    main()
