"""Muon against AdamW: steps (and wall time) to AdamW's best validation loss, and optimizer-step
time at 1 and 2 ranks, measured in one run.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_muon [--steps 600] [--sft-steps 300]
        [--lrs 1e-3,2e-3,4e-3] [--parts convergence,step_time] [--work runs/bench_muon]
        [--set <override> ...]   # the convergence runs' model and batch (default: `SMALL`)

Convergence, through the CLI (`python -m pretrain.train`, experiment=demo with `--set`: by
default the debug GPT (2 blocks of width 64) at seq 64, 1024 tokens per step, warmup 20 +
cosine, sized for a 2-core CPU), on two corpora:

    demo   the embedded corpus as `make demo` prepares it (data/demo: the standard library's
           sources, a 2048-piece tokenizer; prepared here if missing)
    sft    `tests.data_fixtures.sft_records`: stdlib functions as prompt (signature) / response
           (body) records, the loss on the body only, with data/demo's tokenizer

AdamW runs at each of `--lrs`; its target is the lowest validation loss of its best run, reached
at step S_adamw. Muon (optim=muon: match_rms_adamw, so AdamW's lr carries over) runs at the best
AdamW lr, untuned, with the same model, schedule, batches and evaluation, twice: Newton-Schulz
in bf16 (torch's) and in fp32 (`optim.muon_ns_dtype=fp32`: a CPU without bf16 matmuls emulates
them); S_muon is the first evaluation at which its validation loss is at or below the target.
Wall time is the training time to that step (the sum of the logged step times: evaluation
excluded).

Step time (`--parts step_time`): `engine.optimizer_step` alone (clip + step + zero, what a
strategy does after backward), on the demo model (tiny: 6 blocks of width 128), after a real
backward each time, for AdamW, Muon and Muon with fp32 Newton-Schulz; median of `--timed` steps
after 3 warm-up steps, the slowest rank's (micro-batch 4 x seq 128). The three alternate in the
same processes: 1 rank (single, a plain process) and 2 ranks (torchrun, gloo; ddp, fsdp, zero2).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The convergence runs' model and batch: a few minutes per run on 2 CPU cores.
SMALL = [
    "model=debug",
    "train.seq_len=64",
    "train.micro_batch=16",
    "train.global_batch_tokens=1024",
    "train.eval_batches=8",
    "schedule.warmup_steps=20",
    "data.num_workers=0",
]


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


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    out.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pretrain" / "torch_extensions")
    )
    return out


# ---- corpora --------------------------------------------------------------------------------


def demo_data() -> Path:
    data = REPO / "data" / "demo"
    if not (data / "manifest.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "pretrain.prepare",
            f"output={data}",
            "tokenizer.vocab_size=2048",
        ]
        subprocess.run(cmd, cwd=REPO, env=env(), check=True)
    return data


def sft_data(work: Path, tokenizer: Path) -> Path:
    out = work / "data-sft"
    if (out / "manifest.json").is_file():
        return out
    from pretrain.prepare import PrepareConfig, TokenizerConfig, run_prepare
    from tests.data_fixtures import sft_records

    src = work / "sft-corpus"
    src.mkdir(parents=True, exist_ok=True)
    records = sft_records(100_000)
    (src / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = PrepareConfig(
        input=str(src / "records.jsonl"),
        output=str(out),
        tokenizer=TokenizerConfig(path=str(tokenizer)),
        shard_tokens=16_384,
        val_fraction=0.1,
        num_proc=1,
    )
    return run_prepare(cfg)


# ---- convergence ----------------------------------------------------------------------------


def train(
    run_dir: Path, data: Path, steps: int, every: int, *overrides: str, reuse: bool = False
) -> list[dict]:
    """One CLI run from scratch; its metrics.jsonl rows. `reuse`: a finished run of the same
    command in `run_dir` is read instead (runs are deterministic)."""
    cmd = [
        sys.executable, "-m", "pretrain.train", "experiment=demo", "logging=quiet",
        f"data.dir={data}", f"run.dir={run_dir}", f"train.max_steps={steps}",
        f"train.eval_every={every}", f"checkpoint.every={steps}", "checkpoint.keep_last=1",
        "logging.every=1",
        *overrides,
    ]  # fmt: skip
    marker = run_dir / "bench_command.json"
    metrics = run_dir / "metrics.jsonl"
    if reuse and marker.is_file() and json.loads(marker.read_text()) == cmd[1:]:
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        if any(r.get("step") == steps and "val_loss" in r for r in rows):
            return rows
    shutil.rmtree(run_dir, ignore_errors=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    marker.write_text(json.dumps(cmd[1:]))
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def curve(rows: list[dict]) -> tuple[list[tuple[int, float]], dict[int, float]]:
    """(step, val_loss) pairs, and the training wall time (s) up to each step."""
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    wall, total = {}, 0.0
    for r in sorted((r for r in rows if "step_time_s" in r), key=lambda r: r["step"]):
        total += r["step_time_s"]
        wall[r["step"]] = total
    return val, wall


def first_at_or_below(val: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in val if v <= target), None)


# Muon's runs: torch's bf16 Newton-Schulz, and fp32 (this CPU has no bf16 matmul).
MUON_VARIANTS = {"muon": [], "muon ns fp32": ["optim.muon_ns_dtype=fp32"]}


def convergence(name: str, data: Path, steps: int, every: int, lrs: list[float], work: Path,
                extra: list[str], reuse: bool) -> dict[str, Any]:  # fmt: skip
    runs: dict[str, Any] = {}
    for lr in lrs:
        val, wall = curve(train(work / f"{name}-adamw-{lr:g}", data, steps, every,
                                "optim=adamw", f"optim.lr={lr}", *extra, reuse=reuse))  # fmt: skip
        runs[f"adamw lr={lr:g}"] = (lr, val, wall)
        print(f"{name} adamw lr={lr:g}: best val {min(v for _, v in val):.4f}", flush=True)
    best_key = min(runs, key=lambda k: min(v for _, v in runs[k][1]))
    best_lr, best_val, best_wall = runs[best_key]
    target = min(v for _, v in best_val)
    s_adamw = first_at_or_below(best_val, target)
    assert s_adamw is not None
    muon = {}
    for variant, more in MUON_VARIANTS.items():
        tag = variant.replace(" ", "-")
        val, wall = curve(train(work / f"{name}-{tag}-{best_lr:g}", data, steps, every,
                                "optim=muon", f"optim.lr={best_lr}", *more, *extra, reuse=reuse))  # fmt: skip
        s_muon = first_at_or_below(val, target)
        print(f"{name} {variant} lr={best_lr:g}: best val {min(v for _, v in val):.4f}", flush=True)
        muon[variant] = {
            "steps": s_muon,
            "wall_s": wall[s_muon] if s_muon else None,
            "best_val": min(v for _, v in val),
            "s_per_step": wall[steps] / steps,
        }
    return {
        "corpus": name,
        "adamw": {
            k: {"lr": lr, "best_val": min(v for _, v in c)} for k, (lr, c, _) in runs.items()
        },
        "best_lr": best_lr,
        "target": target,
        "adamw_steps": s_adamw,
        "adamw_wall_s": best_wall[s_adamw],
        "adamw_s_per_step": best_wall[steps] / steps,
        "muon": muon,
    }


# ---- optimizer step time --------------------------------------------------------------------


def step_worker(args: argparse.Namespace) -> None:
    """Under torchrun (or plainly for 1 rank): time engine.optimizer_step for each strategy,
    AdamW and Muon alternating."""
    from hydra import compose, initialize_config_dir

    from pretrain import dist
    from pretrain.engine import create_engine
    from pretrain.engine.process_group import reset_accelerate_state
    from pretrain.model import GPTConfig
    from pretrain.optim import build_optimizer

    torch.set_num_threads(1)
    results = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for strategy in args.strategies.split(","):
            variants = {"adamw": ["optim=adamw"], "muon": ["optim=muon"],
                        "muon ns fp32": ["optim=muon", "optim.muon_ns_dtype=fp32"]}  # fmt: skip
            times: dict[str, list[float]] = {k: [] for k in variants}
            for rnd in range(args.rounds):
                for optim, chosen in variants.items():
                    cfg = compose(config_name="config", overrides=[
                        "experiment=demo", f"strategy={strategy}", *chosen,
                        "model.vocab_size=2048", "train.micro_batch=4", "dist.timeout_s=300",
                    ])  # fmt: skip
                    engine = create_engine(cfg, accum=1)  # type: ignore[arg-type]
                    model_cfg = GPTConfig(**cfg.model)
                    make = functools.partial(build_optimizer, cfg=cfg.optim, device=engine.device)
                    engine.build(model_cfg, make)
                    g = torch.Generator().manual_seed(rnd)
                    for step in range(3 + args.timed):
                        x = torch.randint(0, 2048, (4, cfg.train.seq_len + 1), generator=g)
                        engine.micro_step(x[:, :-1], x[:, 1:], True)
                        if engine.world_size > 1:
                            torch.distributed.barrier()
                        t0 = time.perf_counter()
                        engine.optimizer_step(1e-3, 1.0)
                        if step >= 3:
                            times[optim].append(time.perf_counter() - t0)
                    del engine
                    gc.collect()
                    reset_accelerate_state()
            median = {k: statistics.median(v) for k, v in times.items()}
            if dist.world_size() > 1:
                every: list[Any] = [None] * dist.world_size()
                torch.distributed.all_gather_object(every, median)
                median = {k: max(m[k] for m in every) for k in median}
            results.append({"strategy": strategy, "ranks": dist.world_size(), **median})
    if dist.is_main():
        Path(args.out).write_text(json.dumps(results))
    if dist.initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    os._exit(0)


def step_times(work: Path, timed: int, rounds: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for nproc, strategies in ((0, "single"), (2, "ddp,fsdp,zero2")):
        path = work / f"step-time-{nproc}.json"
        me = [str(Path(__file__).resolve()), "--worker", "--out", str(path),
              "--strategies", strategies, "--timed", str(timed), "--rounds", str(rounds)]  # fmt: skip
        if nproc:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--standalone", *me]  # fmt: skip
        else:
            cmd = [sys.executable, *me]
        subprocess.run(cmd, cwd=REPO, env=env(), check=True, capture_output=True)
        out += json.loads(path.read_text())
    return out


# ---- report ---------------------------------------------------------------------------------


def report(conv: list[dict[str, Any]], steps: list[dict[str, Any]], argv: list[str]) -> str:
    lines = [f"Command: `OMP_NUM_THREADS=1 python -m benchmarks.bench_muon {' '.join(argv)}`",
             f"Machine: {machine()}", ""]  # fmt: skip
    if conv:
        lines += [
            "| corpus | AdamW best val loss by lr | target (AdamW's best) | optimizer | steps to "
            "target | vs AdamW | train wall to target | vs AdamW | best val loss | s/step |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in conv:
            by_lr = ", ".join(f"{v['lr']:g}: {v['best_val']:.4f}" for v in c["adamw"].values())
            head = f"| {c['corpus']} | {by_lr} | {c['target']:.4f} (lr {c['best_lr']:g}) "
            lines.append(
                head + f"| AdamW | {c['adamw_steps']} | 1.00x | {c['adamw_wall_s']:.1f} s | 1.00x "
                f"| {c['target']:.4f} | {c['adamw_s_per_step']:.3f} |"
            )
            for variant, m in c["muon"].items():
                if m["steps"]:
                    reached = (f"{m['steps']} | {m['steps'] / c['adamw_steps']:.2f}x | "
                               f"{m['wall_s']:.1f} s | {m['wall_s'] / c['adamw_wall_s']:.2f}x")  # fmt: skip
                else:
                    reached = "not reached | - | - | -"
                lines.append(
                    f"| | | | {variant} | {reached} | {m['best_val']:.4f} | {m['s_per_step']:.3f} |"
                )
        lines.append("")
    if steps:
        names = [k for k in steps[0] if k not in ("strategy", "ranks")]
        lines += [
            "| ranks | strategy | " + " | ".join(f"{n} step (ms)" for n in names) + " | "
            + " | ".join(f"{n} / adamw" for n in names[1:]) + " |",
            "|---|---|" + "---:|" * (2 * len(names) - 1),
        ]  # fmt: skip
        for s in steps:
            lines.append(
                f"| {max(1, s['ranks'])} | {s['strategy']} | "
                + " | ".join(f"{s[n] * 1e3:.1f}" for n in names) + " | "
                + " | ".join(f"{s[n] / s['adamw']:.2f}x" for n in names[1:]) + " |"
            )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    ap.add_argument("--strategies", default="single")
    ap.add_argument("--parts", default="convergence,step_time")
    ap.add_argument("--corpora", default="demo,sft")
    ap.add_argument("--steps", type=int, default=600, help="demo corpus: steps per run")
    ap.add_argument("--sft-steps", type=int, default=300, help="sft corpus: steps per run")
    ap.add_argument("--every", type=int, default=20, help="evaluate every N steps")
    ap.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="AdamW learning rates")
    ap.add_argument("--set", nargs="*", default=SMALL, help="overrides of every convergence run")
    ap.add_argument("--reuse", action="store_true", help="read finished runs of the same command")
    ap.add_argument("--timed", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_muon"))
    args = ap.parse_args()
    if args.worker:
        step_worker(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    conv = []
    if "convergence" in parts:
        demo = demo_data()
        corpora = {
            "demo": (demo, args.steps, list(args.set)),
            # ~150k training tokens: fewer steps, and partitions its windows can fill.
            "sft": (
                sft_data(work, demo / "tokenizer.model"),
                args.sft_steps,
                [*args.set, "data.partitions=16"],
            ),
        }
        for name in args.corpora.split(","):
            data, steps, extra = corpora[name]
            conv.append(convergence(name, data, steps, args.every, lrs, work, extra, args.reuse))
    steps = step_times(work, args.timed, args.rounds) if "step_time" in parts else []
    text = report(conv, steps, sys.argv[1:])
    (work / "report.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps({"convergence": conv, "step_time": steps}))
    print(text)


if __name__ == "__main__":
    main()
