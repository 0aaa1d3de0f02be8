"""The training app's side of a sweep: what a trial sets up, reports, and leaves behind.

A trial is an ordinary run (`pretrain.training.loop.train`), with four differences:

- its run directory is its own, under the sweep directory (`prepare`), and it only ever
  resumes as the same trial: `trial.yaml` records the overrides it was started with, and a run
  directory that holds another trial is refused (`claim_run_dir`);
- its W&B run is in the sweep's group (`logging.wandb_group`);
- in an Optuna sweep, rank 0 reports every validation of the objective to the study and asks
  the study's pruner whether to go on (`Pruner`);
- it ends by writing `result.json` (`finish`, the format `TrialResult`), which the sweeper, the
  torchrun launcher and results.csv read, by recording its result in the study itself (so that
  the trials after it know it at once), and by returning its objective to the sweeper (or
  raising `optuna.TrialPruned`).

Hydra's basic launcher runs every trial in the sweep's own process, one after another, so a
trial leaves the process as it found it (`restored_process`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import CompactHydraException

from pretrain import dist
from pretrain.config import ConfigError
from pretrain.sweep.lock import hold_run_dir, release_run_dir

RESULT_FILE = "result.json"
TRIAL_FILE = "trial.yaml"
# Overrides a trial gets from where it runs, not from what it is (see `trial_settings`): they
# are left out of its identity, so that a trial killed under one launcher resumes under another.
PLACEMENT_KEYS = ("run.dir", "run.name", "sweep.dir", "logging.wandb_group")


_held: list[Path] = []  # the trial run dirs this process holds (released between trials)


class TrialFailed(CompactHydraException):
    """A trial that ended with an error (printed above it). The Optuna sweeper records it as
    failed; Hydra's basic sweeper stops with this one line."""


@dataclass
class TrialResult:
    """How a trial ended: `<run dir>/result.json`, written by rank 0 once the run is over."""

    state: str
    """complete or pruned."""
    objective: str
    """The metric (sweep.objective)."""
    value: float | None
    """Its last logged value: the trial's result."""
    step: int
    """Optimizer steps done."""
    tokens: int
    """Training tokens seen."""
    started: float
    """Unix time the (last) start of the trial began."""
    ended: float
    """Unix time it ended."""
    trial: int = -1
    """Its Optuna trial number (-1 under Hydra's basic sweeper)."""
    overrides: list[str] = field(default_factory=list)
    """Its overrides (the swept parameters among them)."""

    @property
    def wall_s(self) -> float:
        return self.ended - self.started


def write_result(run_dir: Path, result: TrialResult) -> Path:
    path = Path(run_dir) / RESULT_FILE
    tmp = path.with_name(f".{RESULT_FILE}.tmp")
    tmp.write_text(json.dumps(asdict(result), indent=1) + "\n")
    os.replace(tmp, path)  # readers see the whole file or none
    return path


def read_result(run_dir: Path | str) -> TrialResult | None:
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    return TrialResult(**json.loads(path.read_text()))


def last_logged(run_dir: Path, key: str) -> float | None:
    """The newest value of `key` in the run's metrics.jsonl (appended across resumes)."""
    from pretrain.metrics import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    values = [r[key] for r in read_metrics(Path(run_dir)) if key in r]
    return float(values[-1]) if values else None


# ---- setting up: where a trial runs ---------------------------------------------------------


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def trial_settings(cfg: Any, output_dir: str, sweep_dir: str, num: int) -> dict[str, str]:
    """What makes a job of a multirun a run of its own: its Hydra output directory as run.dir
    (trials never share checkpoints), a W&B run named after it in the sweep's W&B group."""
    return {
        "run.dir": str(Path(output_dir).absolute()),
        "run.name": f"{cfg.run.name}-{num}",
        "sweep.dir": str(Path(sweep_dir).absolute()),
        "logging.wandb_group": cfg.logging.wandb_group or Path(sweep_dir).absolute().name,
    }


def prepare(cfg: Any) -> None:
    """In a multirun job (run in this process by Hydra's basic launcher, or in a Slurm job by
    the submitit launcher): make it its own run."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    for key, value in trial_settings(
        cfg, hc.runtime.output_dir, hc.sweep.dir, int(hc.job.num)
    ).items():
        OmegaConf.update(cfg, key, value)


def own_overrides() -> list[str]:
    """This trial's overrides as Hydra received them, without the placement ones."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    task = list(HydraConfig.get().overrides.task)
    return [o for o in task if o.split("=", 1)[0].lstrip("+~") not in PLACEMENT_KEYS]


def claim_run_dir(cfg: Any) -> None:
    """Refuse to continue a run directory that another trial started (a different sweep that
    landed in the same hydra.sweep.dir), or that a process still runs in (the Slurm job of a
    killed sweep's trial, say); record this trial's overrides in a fresh one. Every rank checks
    the overrides; rank 0 holds the lock and writes."""
    run_dir = Path(cfg.run.dir)
    claim(run_dir, own_overrides(), cfg.sweep.dir, write=dist.is_main())
    if dist.is_main():
        holder = hold_run_dir(run_dir)  # the run's own lock: train() finds it held
        if holder is not None:
            raise ConfigError(
                f"{run_dir} is in use by another run of this trial ({holder}): let it finish "
                "(the sweep then records its result), or stop it (scancel its Slurm job) first"
            )
        _held.append(run_dir)


def claim(run_dir: Path, overrides: list[str], sweep_dir: str, write: bool = True) -> None:
    path = run_dir / TRIAL_FILE
    if path.is_file():
        theirs = (yaml.safe_load(path.read_text()) or {}).get("overrides", [])
        if sorted(theirs) != sorted(overrides):
            diff = sorted(set(theirs) ^ set(overrides))
            raise ConfigError(
                f"{run_dir} holds a trial of another sweep (its overrides differ in: "
                f"{' '.join(diff)}). Repeat that sweep's command to continue it, or start this "
                "sweep in a new directory: hydra.sweep.dir=<dir> (or another run.name)"
            )
        return
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{TRIAL_FILE}.tmp")
        tmp.write_text(yaml.safe_dump({"sweep": sweep_dir, "overrides": overrides}))
        os.replace(tmp, path)


def check(cfg: Any) -> None:
    """A trial's objective must be logged: validation metrics need validation."""
    if cfg.sweep.objective.startswith("val_") and cfg.train.eval_batches <= 0:
        raise ConfigError(
            f"sweep.objective={cfg.sweep.objective} needs validation, but train.eval_batches=0 "
            "turns it off: set train.eval_batches>0, or sweep.objective=loss"
        )


# ---- during the run: the pruner -------------------------------------------------------------


class Pruner:
    """The study's pruner as the training loop sees it. `report(step, values)` sends the
    objective's value from one validation to the study and returns whether the study's pruner
    says this trial is clearly worse than the others at this step and should stop.

    Only rank 0 talks to the study; the other ranks get False, and the loop agrees on rank 0's
    answer with one collective. Outside an Optuna sweep (`sweep.trial=-1`) it never stops a run.
    The values reported are those of `sweep.objective` at validation steps: with
    `sweep.objective=loss` nothing is reported and nothing is pruned."""

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        self.objective = cfg.sweep.objective
        self.trial: Any = None
        if cfg.sweep.trial < 0 or not cfg.sweep.storage or not dist.is_main():
            return
        # Here, not at the top: `study` imports optuna, which only a trial of an Optuna sweep
        # needs, and every training run imports this module.
        from pretrain.sweep.study import open_trial

        self.trial = open_trial(cfg.sweep.storage, cfg.sweep.study_name, cfg.sweep.trial)
        # Where the trial runs: a sweep continued after a kill reads its result.json there.
        self.trial.set_user_attr("run_dir", str(Path(run_dir).absolute()))

    def report(self, step: int, values: Mapping[str, float]) -> bool:
        if self.trial is None or self.objective not in values:
            return False
        self.trial.report(float(values[self.objective]), step)
        return bool(self.trial.should_prune())


# ---- the end: result.json, the value returned to the sweeper -----------------------------------


def finish(cfg: Any, step: int, tokens: int, pruned: bool, started: float) -> TrialResult:
    """Rank 0 writes result.json; every rank returns the result (the objective is read back
    from metrics.jsonl, so a trial resumed at its last step has it too)."""
    run_dir = Path(cfg.run.dir)
    value = last_logged(run_dir, cfg.sweep.objective)
    if value is None:
        raise TrialFailed(
            f"trial in {run_dir} never logged sweep.objective={cfg.sweep.objective} "
            "(see metrics.jsonl): it has no result"
        )
    result = TrialResult(
        state="pruned" if pruned else "complete",
        objective=cfg.sweep.objective,
        value=value,
        step=step,
        tokens=tokens,
        started=started,
        ended=time.time(),
        trial=int(cfg.sweep.trial),
        overrides=own_overrides(),
    )
    if dist.is_main():
        write_result(run_dir, result)
        if cfg.sweep.trial >= 0 and cfg.sweep.storage:
            from pretrain.sweep.study import tell  # optuna: see Pruner

            # At once, not when the sweeper's batch is over: the trials still running (the next
            # ones in this process, or other Slurm jobs) are pruned and sampled knowing it.
            tell(cfg.sweep.storage, cfg.sweep.study_name, result.trial, result.state, value)
    return result


def returned(result: TrialResult) -> float:
    """What a multirun job returns to the sweeper: the objective, or `optuna.TrialPruned`."""
    if result.state == "pruned":
        import optuna

        raise optuna.TrialPruned(
            f"pruned at step {result.step} ({result.objective} {result.value:.4f})"
        )
    assert result.value is not None
    return result.value


# ---- between trials in one process ----------------------------------------------------------


@contextlib.contextmanager
def restored_process() -> Iterator[None]:
    """Leave the process as the trial found it, however the trial ended, for the next trial
    Hydra's basic launcher runs in it: no process group, no failure watcher, no Accelerate
    singletons (a second Accelerator would inherit the first one's state), no open W&B run (a
    later wandb.init would return it instead of a new run), and the environment variables the
    trial set (the one-rank process group's, DeepSpeed's switch) gone."""
    env = dict(os.environ)
    try:
        yield
    finally:
        while _held:
            release_run_dir(_held.pop())
        dist.stop_watching()
        from pretrain.engine import process_group

        process_group.destroy()
        process_group.reset_accelerate_state()
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            with contextlib.suppress(Exception):
                wandb.run.finish(exit_code=1)  # only a trial that failed leaves one open
        os.environ.clear()
        os.environ.update(env)
