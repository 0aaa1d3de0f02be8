"""What saving costs a run: synchronous checkpoints against background ones
(`checkpoint.async_save`), measured in the same processes, interleaved.

    python -m benchmarks.bench_checkpoint [--models gpt2-124m gpt2-350m] [--ranks 1 2]
        [--rounds 3] [--steps 3]

For each model shape and rank count, one job (1 rank: `single`; 2 ranks: `fsdp` under
torchrun, each rank saving its half) builds the engine (fp32, AdamW, micro-batch 1 x seq 64,
random tokens) and then runs `--rounds` rounds of three cycles, interleaved so that any drift
in the machine's load hits all three alike:

    none    `--steps` training steps
    sync    a save through `Checkpointer` (the loop's own), then `--steps` steps
    async   the same with `checkpoint.async_save=true`, then `--steps` steps (the write runs
            beside them), then the wait for whatever of the write is left

Reported (medians over rounds; the max over ranks of each cycle):

    stall     how long the save held training up (sync: the whole save; async: staging)
    added     cycle time minus the `none` cycle's: what one save costs the run in total (for
              async: its stall, the steps slowed while the writer shares the cores, and any
              wait at the end)
    ratio     async added / sync added (the goal: at most 0.25)
    staged    the host memory the async save's staging buffers hold, per rank (measured from
              the buffers)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEQ = 64


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pretrain import dist
    from pretrain.checkpoint import Checkpointer
    from pretrain.engine import create_engine
    from pretrain.model import GPTConfig
    from pretrain.optim import build_optimizer

    strategy = "single" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "fsdp"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                "experiment=debug", f"model={args.model}", "model.vocab_size=50304",
                "model.dropout=0.0", f"strategy={strategy}", "train.micro_batch=1",
                f"train.seq_len={SEQ}",
            ],
        )  # fmt: skip
    engine = create_engine(cfg, accum=1)  # type: ignore[arg-type]
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))  # type: ignore[arg-type]
    engine.build(model_cfg, lambda m: build_optimizer(m, cfg.optim, engine.device))
    g = torch.Generator().manual_seed(engine.rank)
    state = SimpleNamespace(step=0, state_dict=lambda: {"step": state.step}, rng_state_dict=dict)

    def steps(n: int) -> None:
        for _ in range(n):
            x = torch.randint(0, 50304, (1, SEQ + 1), generator=g)
            engine.micro_step(x[:, :-1], x[:, 1:], True)
            engine.optimizer_step(1e-4, 1.0)
            state.step += 1

    root = Path(args.dir)
    ckpts = {
        mode: Checkpointer(
            root / mode,
            SimpleNamespace(every=1, keep_last=1, resume="none", async_save=mode == "async"),
            {"model": OmegaConf.to_container(cfg.model)},
            max_steps=10**9,
        )
        for mode in ("sync", "async")
    }
    steps(2)  # warm-up
    cycles: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    for _ in range(args.rounds):
        for mode in ("none", "sync", "async"):
            dist.barrier()
            t0 = time.perf_counter()
            if mode != "none":
                ckpts[mode].save(engine, state)  # type: ignore[arg-type]
                stalls[mode].append(time.perf_counter() - t0)
            steps(args.steps)
            if mode == "async":
                ckpts[mode].close()
            cycles[mode].append(time.perf_counter() - t0)
    background = ckpts["async"].background
    native = getattr(engine, "_native_stagers", {})
    staged = (background.stager.nbytes if background else 0) + sum(
        s.nbytes for s in native.values()
    )
    mine = {"cycles": cycles, "stalls": stalls, "staged": staged}
    everyone = dist.gather_objects(mine)
    if dist.is_main():
        Path(args.out).write_text(json.dumps({"params": engine.num_params, "ranks": everyone}))


def job(model: str, ranks: int, rounds: int, n_steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        launcher = [sys.executable]
        if ranks > 1:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone"]
        cmd = [
            *launcher, str(Path(__file__).resolve()), "--worker", "--model", model,
            "--rounds", str(rounds), "--steps", str(n_steps), "--dir", str(Path(tmp) / "ck"),
            "--out", str(out),
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2-124m", "gpt2-350m"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--dir", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for model in args.models:
        for ranks in args.ranks:
            res = job(model, ranks, args.rounds, args.steps)
            per = res["ranks"]

            def med(kind: str, mode: str, per: list = per) -> float:
                # The slowest rank of each round, then the median over rounds.
                rounds = zip(*(r[kind][mode] for r in per), strict=True)
                return statistics.median(max(x) for x in rounds)

            none = med("cycles", "none")
            added = {m: med("cycles", m) - none for m in ("sync", "async")}
            rows.append(
                f"| {model} ({res['params'] / 1e6:.0f}M) | {ranks} | {none:.1f} | "
                f"{med('stalls', 'sync'):.2f} | {med('stalls', 'async'):.2f} | "
                f"{added['sync']:.2f} | {added['async']:.2f} | "
                f"{added['async'] / added['sync']:.2f} | "
                f"{max(r['staged'] for r in per) / 1e9:.2f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"{args.rounds} rounds; a cycle is a save and {args.steps} steps; fp32, seq {SEQ}\n")
    print(
        f"| model | ranks | {args.steps} steps s | sync stall s | async stall s | "
        "sync added s | async added s | async/sync | staged GB/rank |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
