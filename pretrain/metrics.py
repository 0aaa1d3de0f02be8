"""Where training metrics go: the console, `<run.dir>/metrics.jsonl`, and W&B.

Only rank 0 writes (through `is_main()`). W&B is best effort once started: a failure to log is
reported once and training goes on without it. Starting it is where the modes differ (see
`Metrics`): on a machine that cannot reach W&B, `auto` logs offline at once and says how to
upload later, `online` stops the run before it trains without the record it asked for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pretrain import dist
from pretrain.dist import is_main

if TYPE_CHECKING:
    from pretrain.config import LoggingConfig


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


class WandbUnavailable(RuntimeError):
    """`logging.wandb_mode=online` and W&B could not start a run: the user asked for an online
    record, so the run stops before training instead of training without one."""


def offline_records(wandb_dir: Path, run_id: str) -> list[Path]:
    """The `.wandb` files of run `run_id`'s offline segments under `wandb_dir` that `wandb sync`
    has not uploaded yet (it marks an uploaded file with a `<file>.synced` next to it)."""
    files = wandb_dir.glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb")
    return sorted(f for f in files if not f.with_name(f.name + ".synced").exists())


def sync_command(wandb_dir: Path) -> str:
    """The command that uploads every offline segment under `wandb_dir` (it skips uploaded ones
    and online runs), runnable from any directory."""
    return f"wandb sync {shlex.quote(str(wandb_dir.resolve()))}"


def _one_line(e: BaseException) -> str:
    """An exception as one line: W&B's errors span lines (the cause comes last)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: " + " | ".join(lines)


class Metrics:
    """Rank 0's sinks for the run's metrics. Construction is a collective in
    `logging.wandb_mode=online` (every rank learns whether W&B started, and all stop if not).

    W&B modes: `offline` and `disabled` as W&B defines them. `online` must reach the server
    within `init_timeout_s` (W&B's own `init_timeout`) or the run fails with `WandbUnavailable`.
    `auto`: `WANDB_MODE` if that says offline/disabled; offline without `WANDB_API_KEY`; else
    online, falling back to offline (same run id and config) when W&B cannot start within
    `init_timeout_s`, with one line naming the `wandb sync` command, repeated by `close()`. A run
    with an offline record here that was not uploaded yet continues offline (no wait), so that a
    requeued job adds to the same offline run and one `wandb sync` uploads all of it.

    A run resumed from a checkpoint older than its last logged step re-does the steps after it:
    metrics.jsonl drops their earlier rows, and W&B's run is rewound to the checkpoint's step
    (`wandb.init(resume_from=...)`) so that it too keeps this run's values of those steps, not
    the first ones. An offline record carries the rewind to `wandb sync`, which applies it
    before it uploads the steps that follow (both said in one line at the start)."""

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
        total_steps: int,
        start_step: int,
        progress: bool,
        init_timeout_s: float = 7.0,
        group: str = "",
        every: int = 1,
        plot: bool = False,
    ) -> None:
        self.main = is_main()
        self.every, self.total_steps, self.plot = every, total_steps, plot
        self.run_dir = run_dir
        self.wandb: Any = None
        self.bar: Any = None
        self.jsonl = None
        self.sync_hint: str | None = None  # set when this run logs offline after asking online
        error: str | None = None
        if self.main:
            if progress and sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total_steps, initial=start_step, unit="step", dynamic_ncols=True
                )
            # Steps logged before past the one this run starts from are re-done: W&B rewinds
            # first, so that a start that fails there leaves metrics.jsonl to say so next time.
            redone = _last_step(run_dir / "metrics.jsonl")
            rewind = (start_step, redone) if redone is not None and redone > start_step else None
            if wandb_enabled and mode != "disabled":
                kwargs = dict(
                    project=project, entity=entity, run_id=run_id, name=run_name, group=group
                )
                error = self._start_wandb(config, mode, init_timeout_s, rewind, **kwargs)
            _drop_steps_after(run_dir / "metrics.jsonl", start_step)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - lives with the run
        if wandb_enabled and mode == "online":
            error = _from_rank0(error)
        if error is not None:
            self.close()
            raise WandbUnavailable(error)

    @classmethod
    def from_config(
        cls,
        cfg: LoggingConfig,
        run_dir: Path,
        config: dict[str, Any],
        *,
        run_id: str,
        run_name: str,
        start_step: int,
        total_steps: int,
    ) -> Metrics:
        """The training run's sinks, from `logging.*` and the run's identity: its directory,
        resolved config (W&B's copy), W&B run id and name, and where in its steps it starts."""
        return cls(
            run_dir,
            config,
            wandb_enabled=cfg.wandb,
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            mode=cfg.wandb_mode,
            run_id=run_id,
            run_name=run_name,
            total_steps=total_steps,
            start_step=start_step,
            progress=cfg.progress,
            init_timeout_s=cfg.wandb_init_timeout_s,
            group=cfg.wandb_group,
            every=cfg.every,
            plot=cfg.plot,
        )

    def due(self, step: int) -> bool:
        """Whether `step` is a logging step: every `logging.every` steps, and the last one. The
        loop's collectives that need not run every step (the mean loss over ranks, the NaN
        check, agreeing on a signal) happen at these steps."""
        return step % self.every == 0 or step == self.total_steps

    def _start_wandb(
        self,
        config: dict,
        mode: str,
        timeout_s: float,
        rewind: tuple[int, int] | None,
        *,
        project: str,
        entity: str,
        run_id: str,
        name: str,
        group: str = "",
    ) -> str | None:
        """Start the W&B run (rank 0). Returns the error message when online mode failed.
        `rewind`: (the step this run resumes from, the last step logged before), when the steps
        between are re-done."""
        import wandb

        wandb_dir = self.run_dir / "wandb"
        # Only a run W&B has a record of here can be rewound (W&B refuses an unknown run).
        if rewind is not None and not any(wandb_dir.glob(f"*run-*-{run_id}*/run-{run_id}.wandb")):
            rewind = None
        requested = mode
        if mode == "auto":
            env_mode = os.environ.get("WANDB_MODE", "").lower()
            if env_mode in ("offline", "disabled", "dryrun"):
                mode = "disabled" if env_mode == "disabled" else "offline"
            elif not os.environ.get("WANDB_API_KEY"):
                mode = "offline"
            elif offline_records(wandb_dir, run_id):
                mode = "offline"
                self.sync_hint = sync_command(wandb_dir)
                self.print(
                    f"W&B: run {run_id} logged offline before; continuing its offline record "
                    f"(going online now would split it). Upload later: {self.sync_hint}"
                )
            else:
                mode = "online"
        if mode == "disabled":
            return None

        def start(mode: str, rewind: tuple[int, int] | None = rewind) -> Any:
            # resume="allow": the same id continues the same run after a restart or requeue;
            # resume_from rewinds it to a step first (W&B allows one of the two).
            branch: dict[str, Any] = (
                {"resume_from": f"{run_id}?_step={rewind[0]}"} if rewind else {"resume": "allow"}
            )
            run = wandb.init(
                project=project,
                entity=entity or None,
                id=run_id,
                name=name,
                group=group or None,  # the trials of one sweep share a group
                mode=mode,  # type: ignore[arg-type]
                dir=str(self.run_dir),
                config=config,
                settings=wandb.Settings(silent=True, console="off", init_timeout=timeout_s),
                **branch,
            )
            if rewind:
                first, last = rewind[0] + 1, rewind[1]
                self.print(
                    f"W&B: run {run_id} rewound to step {rewind[0]}: steps {first}-{last}, "
                    "logged before, now keep this run's values as metrics.jsonl does"
                    if mode == "online"
                    else f"W&B: run {run_id} rewinds to step {rewind[0]} in its offline record: "
                    f"`wandb sync` replaces steps {first}-{last} logged before with this run's, "
                    "as metrics.jsonl does"
                )
            return run

        if mode == "online":
            before = set(wandb_dir.glob(f"run-*-{run_id}*"))
            t0 = time.monotonic()
            try:
                self.wandb = start("online")
                return None
            except Exception as e:  # noqa: BLE001 - any failure to start means "not online"
                waited, cause = time.monotonic() - t0, _one_line(e)
            if rewind and "rewind" in cause.lower() and waited < timeout_s:
                # The server answered that it cannot rewind (an older W&B Server): the run goes
                # on as before, W&B keeping the first values of the re-done steps.
                with contextlib.suppress(Exception):
                    wandb.teardown()
                try:
                    self.wandb = start("online", rewind=None)
                    self.print(
                        f"W&B: could not rewind run {run_id} ({cause}): W&B keeps the first "
                        f"values of steps {rewind[0] + 1}-{rewind[1]}; metrics.jsonl has this "
                        "run's"
                    )
                    return None
                except Exception as e:  # noqa: BLE001
                    waited, cause = time.monotonic() - t0, _one_line(e)
            # The failed run still holds its id in W&B's service process, and left a directory
            # with nothing of the run in it: free both, so the offline run can take the id and
            # no empty "online" run sits next to it.
            with contextlib.suppress(Exception):
                wandb.teardown()
            for leftover in set(wandb_dir.glob(f"run-*-{run_id}*")) - before:
                shutil.rmtree(leftover, ignore_errors=True)
            url = wandb.Settings().base_url
            if requested == "online":
                return (
                    f"logging.wandb_mode=online but W&B could not start a run at {url} within "
                    f"{waited:.1f} s ({cause}). Nothing was trained. Check the network and "
                    "WANDB_API_KEY, or use logging.wandb_mode=auto (falls back to offline and "
                    "prints the `wandb sync` command) or logging.wandb_mode=offline"
                )
            self.sync_hint = sync_command(wandb_dir)
            self.print(
                f"W&B: could not reach {url} within {waited:.1f} s ({cause}); logging offline "
                f"instead to {wandb_dir}. Upload later: {self.sync_hint}"
            )
        try:
            self.wandb = start("offline")
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            self.warn(f"W&B disabled: could not start a run ({_one_line(e)})")
            self.wandb, self.sync_hint = None, None
        return None

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

    def finish(self, completed: bool) -> None:
        """The run's end: close the sinks, then (rank 0, `logging.plot`) draw the loss curve of
        a run that completed; one that stops to be requeued draws it when it completes."""
        self.close()
        if self.plot and self.main and completed:
            try:
                plot_loss_curve(self.run_dir)
            except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
                self.print(f"warning: no loss curve ({type(e).__name__}: {e})")

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                self.warn(f"W&B finish failed ({type(e).__name__}: {e})")
            self.wandb = None
            if self.sync_hint:
                self.print(f"W&B: this run was logged offline. Upload it with: {self.sync_hint}")
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def _from_rank0(error: str | None) -> str | None:
    """Rank 0's `error` on every rank (a collective when a process group exists)."""
    if not dist.initialized() or dist.world_size() == 1:
        return error
    import torch.distributed as tdist

    box = [error]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _rows(lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The whole rows of metrics.jsonl's `lines`, each with its parsed value. A line that is
    not JSON can only be the last one, cut off by a kill in the middle of its write: it is
    not a row."""
    out = []
    for ln in lines:
        if not ln.strip():
            continue
        try:
            out.append((ln if ln.endswith("\n") else ln + "\n", json.loads(ln)))
        except ValueError:
            continue
    return out


def _last_step(path: Path) -> int | None:
    """The highest step in metrics.jsonl at `path`, or None without rows."""
    if not path.is_file():
        return None
    rows = _rows(path.read_text().splitlines())
    return max((row.get("step", 0) for _, row in rows), default=None)


def _drop_steps_after(path: Path, step: int) -> None:
    """A resumed run re-does the steps after its checkpoint: their rows from before (logged
    between that checkpoint and the interruption) go, so that no step appears twice. Rewritten
    to a temp file and renamed: a full disk leaves the old file."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln, row in _rows(lines) if row.get("step", 0) <= step]
    if keep == lines:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [row for _, row in _rows(path.read_text().splitlines())]


def plot_loss_curve(run_dir: Path, out: Path | None = None) -> Path | None:
    """Training (and validation) loss against step, as a PNG next to the metrics; a mixture's
    sources' validation curves (`val_loss/<name>`) too, dashed."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    sources = sorted({k for r in rows for k in r if k.startswith("val_loss/")})
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val" + (" (mixture)" if sources else ""))
    for key in sources:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), ".--", label=f"val {key.partition('/')[2]}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = out or Path(run_dir) / "loss.png"
    fig.tight_layout()
    # Drawn beside it and renamed: a run killed (or a disk filled) while drawing leaves the
    # previous curve, never half a PNG.
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
