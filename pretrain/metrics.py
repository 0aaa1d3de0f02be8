"""Where training metrics go: the console, `<run.dir>/metrics.jsonl`, and W&B.

Only rank 0 writes (through `is_main()`). W&B is best effort: a failure to start or to log is
reported once and training goes on without it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.dist import is_main


def memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


def _fmt(key: str, v: Any) -> str:
    if isinstance(v, float):
        if key == "lr":
            return f"{key} {v:.2e}"
        if key in ("tokens_per_s",):
            return f"tok/s {v:,.0f}"
        if key == "mfu":
            return f"mfu {100 * v:.1f}%"
        if key == "mem_gb":
            return f"mem {v:.2f}GB"
        if key == "step_time_s":
            return f"{1000 * v:.0f}ms"
        return f"{key} {v:.4f}"
    return f"{key} {v}"


class Metrics:
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        *,
        wandb_enabled: bool,
        project: str,
        entity: str,
        mode: str,
        run_id: str,
        run_name: str,
        group: str = "",
        total_steps: int,
        start_step: int,
        progress: bool,
    ) -> None:
        self.main = is_main()
        self.run_dir = run_dir
        self.wandb: Any = None
        self.bar: Any = None
        self.jsonl = None
        if not self.main:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - lives with the run
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if wandb_enabled and mode != "disabled":
            self._start_wandb(config, project, entity, mode, run_id, run_name, group)

    def _start_wandb(
        self,
        config: dict,
        project: str,
        entity: str,
        mode: str,
        run_id: str,
        name: str,
        group: str = "",
    ) -> None:
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        try:
            import wandb

            # resume="allow": the same id continues the same run after a restart or requeue.
            self.wandb = wandb.init(
                project=project,
                entity=entity or None,
                id=run_id,
                name=name,
                group=group or None,  # the trials of one sweep share a group
                resume="allow",
                mode=mode,  # type: ignore[arg-type]
                dir=str(self.run_dir),
                config=config,
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            self.warn(f"W&B disabled: could not start a run ({type(e).__name__}: {e})")
            self.wandb = None

    def warn(self, msg: str) -> None:
        if self.main:
            self.print(f"warning: {msg}")

    def print(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, step: int, values: dict[str, Any], console: bool = True) -> None:
        if not self.main:
            return
        values = {k: v for k, v in values.items() if v is not None}
        record = {"step": step, "time": round(time.time(), 3), **values}
        assert self.jsonl is not None
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if console:
            self.print(f"step {step:>6} | " + " | ".join(_fmt(k, v) for k, v in values.items()))
        if self.wandb is not None:
            try:
                self.wandb.log(values, step=step)
            except Exception as e:  # noqa: BLE001
                self.warn(f"W&B logging failed, continuing without it ({type(e).__name__}: {e})")
                self.wandb = None

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                self.warn(f"W&B finish failed ({type(e).__name__}: {e})")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: Path, out: Path | None = None) -> Path | None:
    """Training (and validation) loss against step, as a PNG next to the metrics."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = out or Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
