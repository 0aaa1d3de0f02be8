"""Prepare with a Hugging Face tokenizer.json, against the tokenizers library's own encode_batch
on the same text, measured in the same run; sentencepiece alongside.

    python -m benchmarks.bench_hf_prepare [--files N] [--vocab 8192] [--rounds 3]

The tokenizer: a byte-level BPE in GPT-2's shape (Llama 3's split regex, ByteLevel, no BOS,
`<|endoftext|>` the EOS), trained with `tokenizers` on the embedded corpus (the stdlib) and
saved as tokenizer.json + tokenizer_config.json, the files prepare reads from a model dir.

Rows (tokens/s of wall-clock time and per CPU-second of this process and its children, each the
best of interleaved rounds; tokens counted as prepare counts them: a document's ids + its EOS):
    encode_batch            the library over the documents already in memory, its own threads
                            (one per CPU): the baseline
    encode_batch_fast       the same ids without offsets (what prepare calls), the same threads
    encode_batch, 1 thread  TOKENIZERS_PARALLELISM=false
    prepare, num_proc=2     `run_prepare`: read the files, tokenize in 2 processes of one thread,
                            hash, shuffle, write the shards and the manifest
    prepare, num_proc=1     in this process (a batch is a file's documents: the library's own
                            threads work on one .py file, one document, at a time)
    sentencepiece           its encode over the same documents (one thread), and prepare with a
                            sentencepiece model of the same vocabulary size, num_proc=2
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
from pathlib import Path

import sentencepiece as spm

from benchmarks.bench_data import _cpu, _docs
from pretrain.data import read_manifest
from pretrain.data.sources import Skips, make_units, resolve_inputs, training_sample
from pretrain.prepare import PrepareConfig, TokenizerConfig, run_prepare
from pretrain.tokenizer import train_tokenizer

SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_hf(docs: list[str], vocab: int, dest: Path) -> Path:
    """A GPT-2-shaped byte-level BPE tokenizer.json (+ tokenizer_config.json) in `dest`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "model_max_length": 1024})
    )
    return dest


def encode_batch(
    tok: object, docs: list[str], fast: bool, threads: bool
) -> tuple[int, float, float]:
    """(tokens + one EOS per document, seconds, CPU seconds) of one encode_batch call."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    fn = tok.encode_batch_fast if fast else tok.encode_batch  # type: ignore[attr-defined]
    t, c = time.perf_counter(), _cpu()
    n = sum(len(e.ids) + 1 for e in fn(docs, add_special_tokens=False))
    return n, time.perf_counter() - t, _cpu() - c


def prepare(corpus: Path, out: Path, tokenizer: Path, num_proc: int) -> tuple[int, float, float]:
    """(tokens, seconds, CPU seconds) of one `run_prepare`."""
    cfg = PrepareConfig(
        input=str(corpus / "*.py"),
        output=str(out),
        tokenizer=TokenizerConfig(path=str(tokenizer)),
        num_proc=num_proc,
    )
    t, c = time.perf_counter(), _cpu()
    with contextlib.redirect_stdout(io.StringIO()):
        run_prepare(cfg)
    dt, dc = time.perf_counter() - t, _cpu() - c
    return int(read_manifest(out).raw["num_tokens"]), dt, dc


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=0, help="use the first N stdlib files (0: all)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats; best is reported")
    a = ap.parse_args()
    from tokenizers import Tokenizer

    files = resolve_inputs("stdlib")[0]
    files = files[: a.files] if a.files else files
    load0 = os.getloadavg()[0]
    best: dict[str, float] = {}

    def keep(name: str, n: int, dt: float, dc: float) -> None:
        best[name] = max(best.get(name, 0.0), n / dt)
        best[f"{name}:cpu"] = max(best.get(f"{name}:cpu", 0.0), n / dc)
        best[f"{name}:tokens"] = n

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        corpus.mkdir()
        for i, f in enumerate(files):  # the same files, in a flat dir: a glob names exactly them
            os.symlink(f, corpus / f"{i:05d}.py")
        units = make_units(resolve_inputs(str(corpus / "*.py"))[0])
        docs = _docs(units)
        t = time.perf_counter()
        hf_dir = train_hf(docs, a.vocab, work / "hf")
        t_hf = time.perf_counter() - t
        sample = training_sample(units, 10_000_000, 4096, 0, Skips())
        sp_model = train_tokenizer(sample, a.vocab, work / "sp.model")
        tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        sp = spm.SentencePieceProcessor(model_file=str(sp_model))
        encode_batch(tok, docs[:50], fast=True, threads=True)  # warm-up: page cache, thread pool

        for r in range(a.rounds):
            keep("encode_batch", *encode_batch(tok, docs, fast=False, threads=True))
            keep("encode_batch_fast", *encode_batch(tok, docs, fast=True, threads=True))
            keep("encode_batch_1", *encode_batch(tok, docs, fast=False, threads=False))
            os.environ.pop("TOKENIZERS_PARALLELISM")
            for n_proc in (2, 1):
                keep(f"prepare{n_proc}", *prepare(corpus, work / f"hf{r}{n_proc}", hf_dir, n_proc))
            t, c = time.perf_counter(), _cpu()
            n = sum(len(sp.encode(d)) + 1 for d in docs)
            keep("sp", n, time.perf_counter() - t, _cpu() - c)
            keep("sp_prepare2", *prepare(corpus, work / f"sp{r}", sp_model, 2))

    assert (
        best["prepare2:tokens"] == best["encode_batch:tokens"] == best["encode_batch_fast:tokens"]
    )
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                  if ln.startswith("Model name")), platform.processor())  # fmt: skip
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f} " in
             cpu.replace("\n", " ") + " "]  # fmt: skip
    print(
        f"\nmachine: {model}, {os.cpu_count()} CPUs, flags {' '.join(flags) or 'none of note'}; "
        f"load average {load0:.1f} at start; best of {a.rounds} rounds; {len(files)} stdlib "
        f"files, {len(docs)} documents, vocab {a.vocab} (BPE trained in {t_hf:.0f}s)\n"
    )
    base = best["encode_batch"]
    rows = [
        (f"tokenizers encode_batch, {os.cpu_count()} threads (baseline)", "encode_batch"),
        (f"tokenizers encode_batch_fast, {os.cpu_count()} threads", "encode_batch_fast"),
        ("tokenizers encode_batch, 1 thread", "encode_batch_1"),
        ("prepare, tokenizer.json, num_proc=2", "prepare2"),
        ("prepare, tokenizer.json, num_proc=1", "prepare1"),
        ("sentencepiece encode, 1 thread", "sp"),
        ("prepare, sentencepiece .model, num_proc=2", "sp_prepare2"),
    ]
    base_cpu = best["encode_batch:cpu"]
    print(
        "| prepare | tokens | tokens/s | vs encode_batch | tokens per CPU-second | vs encode_batch |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, key in rows:
        cpu_rate = best[key + ":cpu"]
        print(f"| {name} | {int(best[key + ':tokens']):,} | {best[key]:,.0f} | "
              f"{best[key] / base:.2f} | {cpu_rate:,.0f} | {cpu_rate / base_cpu:.2f} |")  # fmt: skip
    print(
        f"\nprepare at 2 processes / encode_batch at {os.cpu_count()} threads, same run: "
        f"{best['prepare2'] / base:.2f} (wall-clock), {best['prepare2:cpu'] / base_cpu:.2f} (CPU "
        f"time); / encode_batch_fast: {best['prepare2'] / best['encode_batch_fast']:.2f} "
        f"(wall-clock)"
    )


if __name__ == "__main__":
    main()
