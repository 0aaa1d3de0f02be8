"""`python -m pretrain.compress <run dir | checkpoint | HF dir | compressed dir> <out dir>
[--prune FRACTION --prune-method unstructured|structured|structured-global] [--quantize int8 |
int8-dynamic] [--finetune-steps N]`

Writes a smaller model, and what it cost:

    out/compressed.json   what was done (source, pruning, fine-tune, quantisation) and the
                          model's architecture: the marker `pretrain.pretrained` detects (the
                          directory's format is `pretrain.compressed`)
    out/model.safetensors the weights (int8 tensors flattened by torchao; `pretrain.quantize`)
    out/tokenizer.model   the model's tokenizer (tokenizer.json and its config files for a
                          Hugging Face one)
    out/report.json, out/report.md
                          size on disk, parameters (non-zero), val loss, perplexity, bits per
                          byte, CPU generation tokens/s, for the original and each stage, all
                          measured in this run
    out/pruned/, out/finetune/
                          with --finetune-steps: the pruned model before the fine-tune, and the
                          fine-tune's run directory

The steps run in this order: prune (`pretrain.pruning`), recovery fine-tune (a real
`python -m pretrain.train` run with `train.init_from=out/pruned`; an unstructured mask stays
applied, see `pretrain.pruning.keep_zeros`), quantise (`pretrain.quantize`). The result is read
by `pretrain.eval`, `pretrain.sample`, `train.init_from` (fp32 again, dequantised) and, when
every layer keeps one shape and nothing is quantised, `pretrain.export --format hf`.

The data dir (`--data`, default: the one the source was trained on) gives the validation split
the report scores and, for structured pruning, the calibration batches of its train split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from pretrain import checkpoint
from pretrain.compressed import WEIGHTS, config_of, read_info, write_compressed
from pretrain.config import ConfigError
from pretrain.data.shards import DataError, Manifest, read_manifest
from pretrain.model import GPT, GPTConfig
from pretrain.pretrained import Pretrained, check_tokenizer, load_pretrained
from pretrain.pruning import METHODS as PRUNE_METHODS
from pretrain.pruning import PruneError
from pretrain.quantize import METHODS as QUANT_METHODS


class CompressError(ConfigError):
    """A compression request that cannot be carried out; one line, with what to do."""


# ---------------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------------


def tokenizer_files(p: Pretrained) -> list[Path]:
    """The files that hold `p`'s tokenizer, to copy next to its compressed weights."""
    return list(p.tokenizer.files) if p.tokenizer is not None else []


def source_data_dir(p: Pretrained) -> str | None:
    """The data dir the source was trained (or compressed) with, when it says."""
    if p.kind == "checkpoint":
        return checkpoint.data_dir_of(p.path)
    if p.kind == "compressed" and p.info:
        return p.info.get("data") or None
    return None


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def weights_bytes(model: GPT) -> int:
    """Bytes of the model's weight file in our format (written to a temporary file)."""
    from pretrain.quantize import save_weights

    with tempfile.TemporaryDirectory() as tmp:
        return save_weights(model.state_dict(), Path(tmp) / WEIGHTS).stat().st_size


def count_params(model: GPT) -> tuple[int, int]:
    """(parameters, non-zero parameters); a tied matrix counts once, an int8 weight by its
    int8 values."""
    total = nonzero = 0
    for p in model.parameters():
        data = getattr(p, "qdata", p)
        total += data.numel()
        nonzero += int(torch.count_nonzero(data.detach()))
    return total, nonzero


@torch.no_grad()
def generation_tokens_per_s(model: GPT, new_tokens: int, eos_id: int) -> float:
    """Greedy generation of `new_tokens` tokens after EOS, batch 1, with the KV cache (what
    `pretrain.sample` runs), after one warm-up call."""
    idx = torch.tensor([[eos_id]], device=next(model.parameters()).device)
    n = min(new_tokens, model.cfg.block_size - 1)
    model.generate(idx, min(n, 8), temperature=0.0)
    t0 = time.perf_counter()
    out = model.generate(idx, n, temperature=0.0)
    return (out.shape[1] - 1) / (time.perf_counter() - t0)


def measure(
    model: GPT, manifest: Manifest, args: argparse.Namespace, *, size: int | None = None
) -> dict[str, Any]:
    """Everything the report lists about one model, except generation speed (measured for all
    stages together, interleaved: see `main`)."""
    from pretrain.evaluation.split import evaluate_split

    params, nonzero = count_params(model)
    ev = evaluate_split(
        model, manifest, "val", max_documents=args.eval_documents, allow_pipe=args.allow_pipe
    )
    return {
        "weights_bytes": size if size is not None else weights_bytes(model),
        "params": params,
        "nonzero_params": nonzero,
        "val_loss": ev["loss"],
        "val_ppl": ev["ppl"],
        "bits_per_byte": ev["bits_per_byte"],
        "val_tokens": ev["tokens"],
        "val_tokens_per_s": ev["tokens_per_s"],
    }


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def calibration_batches(
    data_dir: str, cfg: GPTConfig, batches: int, allow_pipe: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `batches` micro-batches of the train split (8 windows of min(block_size, 256)
    tokens): what structured pruning scores units on. The val split is left for the report."""
    from pretrain.data.loader import TokenLoader

    seq = min(cfg.block_size, 256)
    it = iter(
        TokenLoader(
            data_dir, "train", seq, 8, seed=0, loop=False, partitions=None, allow_pipe=allow_pipe
        )
    )
    out = []
    for _ in range(batches):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def prune(
    model: GPT, args: argparse.Namespace, data_dir: str, log: Any
) -> tuple[GPT, dict[str, Any]]:
    from pretrain import pruning

    if args.prune_method == "unstructured":
        return model, pruning.prune_unstructured(model, args.prune)
    batches = calibration_batches(data_dir, model.cfg, args.calib_batches, args.allow_pipe)
    t0 = time.perf_counter()
    scores = pruning.importance(model, batches)
    sel = pruning.select(
        model.cfg,
        scores,
        args.prune,
        uniform=args.prune_method == "structured",
        heads=args.prune_heads,
    )
    small = pruning.prune_structured(model, sel)
    log(f"importance over {scores.tokens:,} calibration tokens in {time.perf_counter() - t0:.1f}s")
    info = {
        "method": args.prune_method,
        "fraction": args.prune,
        "prune_heads": args.prune_heads,
        "importance": "taylor (sum over batches of (dL/dgate)^2)",
        "calibration": {"split": "train", "batches": scores.batches, "tokens": scores.tokens},
        **pruning.describe(model.cfg, small.cfg),
        "kept_heads": sel.heads,
    }
    return small, info


def model_overrides(cfg: GPTConfig) -> list[str]:
    """`model.*` overrides that make a training run build exactly `cfg`."""
    out = []
    for f in fields(GPTConfig):
        v = getattr(cfg, f.name)
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, list):
            v = "[" + ",".join(str(x) for x in v) + "]"
        out.append(f"model.{f.name}={v}")
    return out


def finetune_command(
    p: Pretrained, pruned_dir: Path, run_dir: Path, data_dir: str, args: argparse.Namespace
) -> list[str]:
    """The `python -m pretrain.train` command of the recovery fine-tune: the source run's batch
    and optimizer settings (when it is a run), the pruned architecture, --finetune-steps steps
    of a cosine schedule at --finetune-lr, then the user's --finetune overrides."""
    src: dict[str, Any] = {}
    if p.kind == "checkpoint":
        src = checkpoint.read_config(p.path)
    train, optim = src.get("train", {}), src.get("optim", {})
    lr = args.finetune_lr or 0.3 * float(optim.get("lr", 1e-3))
    keep = {
        "train.seq_len": train.get("seq_len"),
        "train.micro_batch": train.get("micro_batch"),
        "train.global_batch_tokens": train.get("global_batch_tokens"),
        "optim.weight_decay": optim.get("weight_decay"),
        "precision.dtype": (src.get("precision") or {}).get("dtype"),
    }
    steps = args.finetune_steps
    return [
        sys.executable, "-m", "pretrain.train",
        f"data.dir={data_dir}", f"run.dir={run_dir}", f"train.init_from={pruned_dir}",
        *model_overrides(config_of(read_info(pruned_dir))),
        *[f"{k}={v}" for k, v in keep.items() if v is not None],
        f"train.max_steps={steps}", f"optim.lr={lr:g}", "schedule.name=cosine",
        f"schedule.warmup_steps={max(1, steps // 10)}", "train.eval_every=0",
        f"checkpoint.every={steps}", "checkpoint.keep_last=1", "train.keep_sparsity=true",
        *args.finetune,
    ]  # fmt: skip


def finetune(cmd: list[str], log: Any) -> None:
    log("+ python " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
        raise CompressError(
            f"the recovery fine-tune failed (exit {proc.returncode}): {' '.join(tail)}. The "
            "pruned model before it is kept; run the command above to see everything"
        )
    for line in proc.stdout.splitlines():
        if line.startswith(("pretrain:", "step")):
            log("  " + line)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def report_md(report: dict[str, Any]) -> str:
    stages = report["stages"]
    base = stages[0]
    lines = [
        f"# Compression of {report['source']}",
        "",
        f"Validation: split `val` of `{report['data']}`, {base['val_tokens']:,} tokens. "
        f"Generation: greedy, batch 1, {report['gen_tokens']} new tokens with the KV cache, best "
        f"of {report['rounds']} interleaved rounds, {report['threads']} CPU thread(s). "
        f"{report['cpu']}",
        "",
        "| model | weights file | vs original | parameters | non-zero | val loss | val ppl | "
        "ppl vs original | bits/byte | generate tokens/s | vs original | val tokens/s | "
        "vs original |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stages:
        lines.append(
            f"| {s['name']} | {s['weights_bytes'] / 1e6:.2f} MB | "
            f"{s['weights_bytes'] / base['weights_bytes']:.3f}x | {s['params']:,} | "
            f"{s['nonzero_params']:,} | {s['val_loss']:.4f} | {s['val_ppl']:.3f} | "
            f"{(s['val_ppl'] / base['val_ppl'] - 1) * 100:+.2f}% | {s['bits_per_byte']:.4f} | "
            f"{s['gen_tokens_per_s']:.1f} | {s['gen_tokens_per_s'] / base['gen_tokens_per_s']:.2f}x"
            f" | {s['val_tokens_per_s']:,.0f} | "
            f"{s['val_tokens_per_s'] / base['val_tokens_per_s']:.2f}x |"
        )
    lines += ["", "Steps:", ""]
    lines += [f"- {step}" for step in report["steps"]]
    if report.get("finetune_command"):
        lines += ["", "Recovery fine-tune command:", "", "```", report["finetune_command"], "```"]
    return "\n".join(lines) + "\n"


def cpu_summary() -> str:
    """The CPU facts that decide int8 speed: oneDNN's ISA level, VNNI, AMX."""
    from pretrain.quantize import _torchao

    _torchao()
    from torchao.utils import _cpu_is_amx_tile_supported, _cpu_is_vnni_supported

    name = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{name}: torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"AVX512-VNNI {'yes' if _cpu_is_vnni_supported() else 'no'}, "
        f"AMX {'yes' if _cpu_is_amx_tile_supported() else 'no'}."
    )


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m pretrain.compress",
        description="Prune and/or quantise a trained model; report size, quality and speed.",
    )
    ap.add_argument("src", help="a run dir, a checkpoint, a Hugging Face dir or a compressed dir")
    ap.add_argument("out", help="new directory for the compressed model and its report")
    ap.add_argument("--prune", type=float, default=None, metavar="FRACTION",
                    help="fraction to remove, in (0, 1): of the block weights (unstructured) or "
                    "of the heads and MLP neurons (structured)")  # fmt: skip
    ap.add_argument("--prune-method", choices=PRUNE_METHODS, default="structured",
                    help="unstructured: global magnitude; structured: the same heads and neurons "
                    "count removed in every layer (exports to HF); structured-global: the "
                    "lowest-importance units over all layers (our format only)")  # fmt: skip
    ap.add_argument("--prune-heads", type=int, default=None, metavar="N",
                    help="structured: query heads to remove per layer (default: FRACTION of them)")  # fmt: skip
    ap.add_argument("--calib-batches", type=int, default=16,
                    help="structured: train-split batches (8 x 256 tokens) to score units on")  # fmt: skip
    ap.add_argument("--quantize", choices=QUANT_METHODS, default=None,
                    help="int8: weight-only; int8-dynamic: int8 weights and activations")  # fmt: skip
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="after pruning: a recovery fine-tune of N optimizer steps")  # fmt: skip
    ap.add_argument("--finetune-lr", type=float, default=0.0,
                    help="its peak learning rate (default: 0.3 x the source run's optim.lr)")  # fmt: skip
    ap.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra pretrain.train override for the fine-tune (repeatable)")  # fmt: skip
    ap.add_argument("--data", default=None,
                    help="prepared data dir (default: the source's): val scores, calibration")  # fmt: skip
    ap.add_argument("--allow-pipe", action="store_true", help="allow a pipe: data dir")
    ap.add_argument("--eval-documents", type=int, default=0,
                    help="score only the first N val documents (0 = the whole split)")  # fmt: skip
    ap.add_argument("--gen-tokens", type=int, default=64, help="tokens per generation timing")
    ap.add_argument("--rounds", type=int, default=3, help="generation timings per model (best)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for scoring and timing (0 = torch's default)")  # fmt: skip
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.prune is None and args.quantize is None:
        raise CompressError("nothing to do: give --prune FRACTION and/or --quantize int8")
    if args.prune is not None and not 0.0 < args.prune < 1.0:
        raise PruneError(
            f"--prune {args.prune}: the fraction to remove must be in (0, 1) (e.g. --prune 0.5 "
            "removes half of the block weights, or of the heads and MLP neurons)"
        )
    if args.prune is None and (args.prune_heads is not None or args.finetune_steps):
        raise CompressError("--prune-heads and --finetune-steps need --prune FRACTION")
    if args.prune_heads is not None and args.prune_method == "unstructured":
        raise CompressError("--prune-heads removes whole heads: use --prune-method structured")
    if args.finetune_steps < 0:
        raise CompressError(f"--finetune-steps {args.finetune_steps} must be >= 0")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CompressError(f"{out} already exists and is not empty: give a new directory")


def compress(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    from pretrain.quantize import model_is_quantized, quantize_model

    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = load_pretrained(args.src)
    if model_is_quantized(p.model):
        what = (p.info or {}).get("quantize", {}).get("method", "int8")
        raise CompressError(
            f"{p.path} is already quantised ({what}): "
            + ("quantise the original model instead" if args.quantize else
               "prune the original fp32 model (--prune and --quantize in one command)")
        )  # fmt: skip
    data_dir = args.data or source_data_dir(p)
    if not data_dir:
        raise CompressError(
            f"{p.path} does not say which data it was trained on: give --data <prepared dir> "
            "(its val split is scored, its train split calibrates structured pruning)"
        )
    manifest = read_manifest(data_dir, allow_pipe=args.allow_pipe)
    check_tokenizer(p, manifest, allow_pipe=args.allow_pipe)
    out = Path(args.out)
    toks = tokenizer_files(p)
    log(f"compress: {p.describe()} | {p.model.num_params() / 1e6:.2f}M params | data {data_dir}")

    source_info = {"path": str(p.path.resolve()), "kind": p.kind}
    info: dict[str, Any] = {"source": source_info, "data": str(data_dir)}
    if p.info:  # a compressed source: what was done before stays on record
        info["before"] = {k: p.info.get(k) for k in ("source", "prune", "finetune")}
    models: list[tuple[str, GPT]] = [("original (fp32)", p.model)]
    steps: list[str] = []
    model = p.model
    finetune_cmd = None

    if args.prune is not None:
        model, info["prune"] = prune(_copy(model), args, data_dir, log)
        pi = info["prune"]
        if pi["method"] == "unstructured":
            desc = f"unstructured {args.prune:.0%}: {pi['zeroed']:,} of {pi['of']:,} block weights zero"
        else:
            heads = pi["heads"] if not pi["uniform"] else pi["heads"][0]
            hidden = pi["mlp_hidden"] if not pi["uniform"] else pi["mlp_hidden"][0]
            desc = (
                f"{pi['method']} {args.prune:.0%}: heads {pi['heads_before'][0]} -> {heads}, "
                f"MLP {pi['mlp_hidden_before'][0]} -> {hidden} per layer"
            )
        steps.append(desc)
        models.append((f"pruned ({desc.split(':')[0]})", model))
        log(desc)
        if args.finetune_steps:
            pruned_dir = write_compressed(out / "pruned", model, info, toks)
            run_dir = out / "finetune"
            cmd = finetune_command(p, pruned_dir, run_dir, data_dir, args)
            finetune_cmd = "python " + " ".join(cmd[1:])
            finetune(cmd, log)
            tuned = load_pretrained(run_dir).model
            _check_zeros_kept(model, tuned, info["prune"])
            model = tuned
            info["finetune"] = {"steps": args.finetune_steps, "run": str(run_dir.resolve()),
                                "command": finetune_cmd}  # fmt: skip
            steps.append(f"recovery fine-tune: {args.finetune_steps} steps ({run_dir})")
            models.append((f"pruned + fine-tuned {args.finetune_steps} steps", model))

    if args.quantize:
        model = _copy(model)
        info["quantize"] = {**quantize_model(model, args.quantize), "torchao": _ao_version()}
        steps.append(
            f"quantised: {args.quantize} ({info['quantize']['tensors']} tensors int8"
            + (", reduced range" if info["quantize"]["reduce_range"] else "")
            + ")"
        )
        models.append((f"{args.quantize}" + (" of the above" if args.prune else ""), model))
        log(steps[-1])

    write_compressed(out, model, info, toks)
    log(f"wrote {out}")

    # Measure every stage in this run: quality once each, generation speed interleaved.
    eos = p.tokenizer.eos_id if p.tokenizer is not None else manifest.eos_id
    results = []
    for name, m in models:
        size = (out / WEIGHTS).stat().st_size if m is model else None
        r = {"name": name, **measure(m, manifest, args, size=size)}
        log(f"{name}: val loss {r['val_loss']:.4f} | ppl {r['val_ppl']:.3f} | "
            f"{r['weights_bytes'] / 1e6:.2f} MB")  # fmt: skip
        results.append(r)
    speeds: list[list[float]] = [[] for _ in models]
    for _ in range(args.rounds):
        for i, (_, m) in enumerate(models):
            speeds[i].append(generation_tokens_per_s(m, args.gen_tokens, eos))
    for r, s in zip(results, speeds):
        r["gen_tokens_per_s"] = max(s)
    report = {
        "source": str(p.path),
        "out": str(out),
        "data": str(data_dir),
        "stages": results,
        "steps": steps,
        "gen_tokens": args.gen_tokens,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "cpu": cpu_summary(),
        "finetune_command": finetune_cmd,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(report_md(report))
    return report


def _copy(model: GPT) -> GPT:
    import copy

    return copy.deepcopy(model)


def _ao_version() -> str:
    from importlib.metadata import version

    return version("torchao")


def _check_zeros_kept(pruned: GPT, tuned: GPT, prune_info: dict[str, Any]) -> None:
    """After fine-tuning an unstructured-pruned model: its zeros are all still zero."""
    if prune_info["method"] != "unstructured":
        return
    from pretrain.pruning import block_matmuls

    after = dict(block_matmuls(tuned))
    moved = sum(
        int(((m.weight == 0) & (after[n].weight != 0)).sum()) for n, m in block_matmuls(pruned)
    )
    if moved:
        raise CompressError(
            f"the fine-tune moved {moved:,} pruned weights away from zero: the optimizer "
            "updates weights whose gradient is zero; fine-tune with AdamW (optim defaults)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = compress(args)
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print((Path(args.out) / "report.md").read_text(), flush=True)
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(main())
