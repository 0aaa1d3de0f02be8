"""Hugging Face export time, and evaluation tokens/s: ours against lm_eval, in the same run.

    python -m benchmarks.bench_hf export [--model gpt2-1.5b]       # the largest that fits here
    python -m benchmarks.bench_hf eval --data data/demo [--model small10m]
    python -m benchmarks.bench_hf --quick                          # both, tiny models (a check)

export: a checkpoint of the model (weights only, random init: the bytes are what matter) is
written with pretrain.checkpoint, then exported in a fresh process per format, timed from
process start to exit (reading the DCP checkpoint, converting, writing). Baseline: today's
format (`pretrain.export ... out.safetensors`, our names, one file) of the same checkpoint in
the same run. Peak RSS is the exporting process's.

eval: one model, exported to HF; the val split of --data scored three ways on the same text,
fp32, one process, the same window length (block_size) and batch (8 windows):
    pretrain.eval        evaluate_split: every token of the split, EOS + document windows
    lm_eval + HFLM       transformers' model of the export, loglikelihood_rolling of the
                         documents' text (lm_eval's perplexity path, as wikitext runs it)
    lm_eval + ours       the same lm_eval requests on PretrainLM (our model, lm_eval driving)
Each side counts the tokens it scored (lm_eval's rolling loglikelihood does not score the EOS).
Best of --rounds interleaved rounds.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pretrain.model import GPTConfig

REPO = Path(__file__).resolve().parents[1]


def preset(name: str, vocab: int) -> GPTConfig:
    raw = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()) or {}
    return GPTConfig(**{**raw, "vocab_size": vocab})


def small_tokenizer(out: Path) -> Path:
    """A 512-piece sentencepiece model from a few stdlib files (its size does not matter here)."""
    from pretrain.data.sources import stdlib_files
    from pretrain.tokenizer import train_tokenizer

    lines = []
    for f in sorted(stdlib_files())[:60]:
        lines += [ln for ln in Path(f).read_text(errors="replace").splitlines() if ln]
    return train_tokenizer(lines, 512, out)


def make_checkpoint(cfg: GPTConfig, run: Path, tokenizer: Path | None = None) -> Path:
    """A run directory holding one weights-only checkpoint of `cfg` (and a tokenizer.model)."""
    from pretrain import checkpoint
    from pretrain.model import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    cfg_dict = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    run.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, run / "tokenizer.model")
    return checkpoint.save(
        run / "checkpoints", 1, {"model": model.state_dict()}, {"step": 1},
        {"model": cfg_dict, "data": {"dir": ""}}, keep_last=1,
    )  # fmt: skip


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_export(ckpt: Path, out: Path, fmt: str, dtype: str) -> dict[str, float]:
    """Run `pretrain.export` in a fresh process; wall seconds and its peak RSS."""
    child = (
        "import resource, sys\n"
        "from pretrain.export import main\n"
        "code = main(sys.argv[1:])\n"
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", child, str(ckpt), str(out), "--format", fmt, "--dtype", dtype],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rss_kb = int(proc.stdout.split("MAXRSS")[-1].split()[0])
    return {"seconds": wall, "peak_rss_gb": rss_kb / 2**20, "gb": dir_bytes(out) / 1e9}


def bench_export(model: str, dtypes: list[str], work: Path) -> None:
    cfg = preset(model, 32000 if "llama" in model else 50257)
    from pretrain.model import GPT

    with torch.device("meta"):
        n = GPT(cfg).num_params()
    print(f"# export: {model}, {n / 1e6:.0f}M parameters, vocab {cfg.vocab_size}")
    work.mkdir(parents=True, exist_ok=True)
    tok = small_tokenizer(work / "tok.model")
    t0 = time.perf_counter()
    ckpt = make_checkpoint(cfg, work / "run", tok)
    print(f"checkpoint written in {time.perf_counter() - t0:.1f}s: {dir_bytes(ckpt) / 1e9:.2f} GB")
    rows = [("safetensors", "fp32")] + [("hf", d) for d in dtypes]
    base = None
    print("| export | seconds | vs safetensors | GB written | GB/s | peak RSS GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for fmt, dtype in rows:
        out = work / (f"out-{dtype}.safetensors" if fmt == "safetensors" else f"hf-{dtype}")
        r = timed_export(ckpt, out, fmt, dtype)
        base = base or r["seconds"]
        print(
            f"| {fmt} {dtype} | {r['seconds']:.1f} | {r['seconds'] / base:.2f} | {r['gb']:.2f} "
            f"| {r['gb'] / r['seconds']:.2f} | {r['peak_rss_gb']:.1f} |",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()


def bench_eval(data: Path, model: str, rounds: int, max_documents: int, work: Path) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from pretrain.data.shards import data_tokenizer, read_manifest, read_shard
    from pretrain.evaluation.harness import PretrainLM
    from pretrain.evaluation.split import evaluate_split
    from pretrain.export import export_hf
    from pretrain.pretrained import load_pretrained

    work.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data)
    cfg = preset(model, manifest.vocab_size)
    ckpt = make_checkpoint(cfg, work / "run", Path(data) / manifest.tokenizer)
    hf_dir = export_hf(ckpt, work / "hf")
    ours = load_pretrained(ckpt)
    docs = [d for s in manifest.shards("val") for d, _ in read_shard(manifest, s)]
    if max_documents:
        docs = docs[:max_documents]
    sp = data_tokenizer(manifest)
    texts = [sp.decode([int(t) for t in d]) for d in docs]
    block, batch = cfg.block_size, 8
    print(
        f"# eval: {model} ({ours.model.num_params() / 1e6:.1f}M params), {len(docs)} val "
        f"documents of {data}, {sum(map(len, docs)):,} tokens, window {block}, batch {batch}, "
        f"{torch.get_num_threads()} threads"
    )

    def requests() -> list:
        return [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts) if t]

    hflm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=batch, dtype="float32")
    adapter = PretrainLM(ours.model, ours.tokenizer, block, batch_size=batch)
    n_rolling = sum(len(ours.tokenizer.encode(t)) for t in texts)

    def run_ours() -> tuple[float, float]:
        r = evaluate_split(
            ours.model, manifest, "val", max_documents=max_documents, batch_tokens=batch * block
        )
        return r["tokens_per_s"], r["bits_per_byte"]

    def run_lm(lm: object) -> tuple[float, float]:
        t0 = time.perf_counter()
        lls = lm.loglikelihood_rolling(requests(), disable_tqdm=True)  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - t0
        n_bytes = sum(len(t.encode()) for t in texts)
        return n_rolling / elapsed, -sum(lls) / math.log(2) / n_bytes

    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, fn in (
            ("pretrain.eval", run_ours),
            ("lm_eval + HFLM (transformers)", lambda: run_lm(hflm)),
            ("lm_eval + PretrainLM (ours)", lambda: run_lm(adapter)),
        ):
            tps, bpb = fn()
            if name not in best or tps > best[name][0]:
                best[name] = (tps, bpb)
    base = best["lm_eval + HFLM (transformers)"][0]
    print("| scorer | tokens/s | vs lm_eval + HFLM | bits/byte |")
    print("|---|---:|---:|---:|")
    for name, (tps, bpb) in best.items():
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f} | {bpb:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["export", "eval", "both"], default="both")
    ap.add_argument("--model", default=None, help="model preset (conf/model)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-documents", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="tiny models: check the benchmark runs")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_hf-"))
    try:
        if args.what in ("export", "both"):
            bench_export(args.model or ("tiny" if args.quick else "gpt2-1.5b"), args.dtypes,
                         work / "export")  # fmt: skip
        if args.what in ("eval", "both"):
            if not (args.data / "manifest.json").is_file():
                sys.exit(f"{args.data} holds no prepared data: run `python -m pretrain.prepare "
                         f"output={args.data} tokenizer.vocab_size=2048` first")  # fmt: skip
            bench_eval(args.data, args.model or ("tiny" if args.quick else "small10m"),
                       1 if args.quick else args.rounds,
                       args.max_documents or (20 if args.quick else 0), work / "eval")  # fmt: skip
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
