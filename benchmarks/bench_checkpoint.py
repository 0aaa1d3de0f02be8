"""What saving costs a run: synchronous checkpoints against background ones
(`checkpoint.async_save`), in the same run, through the real CLI.

    python -m benchmarks.bench_checkpoint --data data/demo [--models gpt2-124m gpt2-350m]
        [--ranks 1 2] [--steps 8] [--every 2]

For each model shape and rank count, four runs of `python -m pretrain.train` on the same data
and batches (fp32, micro-batch 1 x seq 64, AdamW): {sync, async} x {a save every `--every`
steps, only the final save}. A run's loop time is the sum of its steps' times (metrics.jsonl's
step_time_s, saves excluded), its save stalls and, with async, the wait for the last write at
the end. Reported:

    stall     the median time a save held the step up (sync: the whole save, from the log's
              "saved checkpoint ... in X s"; async: the staging copy and any wait for the
              write before it, "staged in X s"), and the first async stall (it allocates
              the staging buffers)
    added     loop time of the run saving every `--every` steps minus that of the same mode's
              run saving only at the end: what the periodic saves cost the run (for async:
              the stalls, the steps slowed while the writer shares the cores, the waits)
    ratio     async added / sync added (the goal: at most 0.25)
    RSS       rank 0's largest resident set logged (metrics.jsonl's mem_gb): the async run's
              holds the staging copy too

1 rank runs `single`, 2 ranks `fsdp` (each rank saves its half). The run directories go to a
temporary directory on the same disk as --tmp (default: the system's).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ = 64  # tokens per step per rank: short steps, so that saves are a visible share
sys.path.insert(0, str(REPO))

from pretrain.metrics import read_metrics  # noqa: E402


def run(
    data: Path, run_dir: Path, model: str, ranks: int, steps: int, every: int, mode: str
) -> tuple[float, list[float], float]:
    """(time the loop took: its steps, its save stalls and the final wait for a background
    write, in seconds; the per-save stalls; rank 0's largest logged resident set in GB) of one
    training run. Process start-up and set-up are left out: they are noise here."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone"]
    cmd = [
        *launcher, "-m", "pretrain.train", "experiment=debug", f"model={model}",
        "model.vocab_size=50304", "model.dropout=0.0", f"data.dir={data}", f"run.dir={run_dir}",
        "strategy=" + ("single" if ranks == 1 else "fsdp"), "train.micro_batch=1",
        f"train.seq_len={SEQ}", f"train.global_batch_tokens={SEQ * ranks}",
        f"train.max_steps={steps}", "train.eval_every=0", "logging.every=1",
        f"checkpoint.every={every}", "checkpoint.keep_last=1",
        f"checkpoint.async_save={'true' if mode == 'async' else 'false'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    pattern = (
        r"staged in ([0-9.]+) s" if mode == "async" else r"saved checkpoint \S+ in ([0-9.]+) s"
    )
    stalls = [float(x) for x in re.findall(pattern, proc.stdout)]
    end_wait = sum(float(x) for x in re.findall(r"waited ([0-9.]+) s for it here", proc.stdout))
    rows = read_metrics(run_dir)
    step_s = sum(r["step_time_s"] for r in rows if "step_time_s" in r)
    rss = max(r.get("mem_gb", 0.0) for r in rows)
    return step_s + sum(stalls) + end_wait, stalls, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["gpt2-124m", "gpt2-350m"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for ranks in args.ranks:
            res: dict[tuple[str, str], tuple[float, list[float], float]] = {}
            for mode in ("sync", "async"):
                for cadence, every in (("every", args.every), ("end", args.steps)):
                    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                        res[mode, cadence] = run(
                            args.data, Path(tmp) / "run", model, ranks, args.steps, every, mode
                        )
                    print(f"{model} x{ranks} {mode} {cadence}: {res[mode, cadence][0]:.1f} s, "
                          f"stalls {res[mode, cadence][1]}", file=sys.stderr, flush=True)  # fmt: skip
            added = {m: res[m, "every"][0] - res[m, "end"][0] for m in ("sync", "async")}
            stalls = {m: res[m, "every"][1] for m in ("sync", "async")}
            saves = len(stalls["sync"])
            rows.append(
                f"| {model} | {ranks} | {saves} | {statistics.median(stalls['sync']):.2f} | "
                f"{statistics.median(stalls['async']):.2f} ({stalls['async'][0]:.2f} first) | "
                f"{added['sync']:.1f} | {added['async']:.1f} | "
                f"{added['async'] / added['sync']:.2f} | {res['sync', 'every'][2]:.2f} | "
                f"{res['async', 'every'][2]:.2f} |"
            )
    print(
        f"{args.steps} steps, a save every {args.every} (and at the end), fp32, "
        f"micro-batch 1 x seq {SEQ}\n"
    )
    print(
        "| model | ranks | saves | sync stall s | async stall s | sync added s | "
        "async added s | async/sync added | sync RSS GB | async RSS GB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
