"""`hydra/sweeper=optuna`: Hydra's Optuna sweeper, on the current Optuna, with pruning and resume.

Its interface is the one users of Hydra's Optuna sweeper know (see `pretrain.sweep.schema`);
what it adds:

- The study lives in `<sweep dir>/study.journal` unless `storage` says otherwise, under the
  name of the sweep dir, and re-running the same command continues it up to `n_trials` trials
  in total (Hydra's runs `n_trials` more each time). Trials that a killed sweep left running
  are continued first, as themselves: the same trial number, parameters and run directory, so
  the trial resumes from its own last checkpoint; one whose run had already ended is only
  recorded (from its result.json). No trial is counted twice.
- Pruning: each trial's rank 0 reports its validation losses to the study, and the study's
  pruner (`hydra/sweeper/pruner`, median by default) stops the clearly worse ones; they are
  recorded as pruned (`pretrain.sweep.trial.Pruner`).
- results.csv, optimization_results.yaml and the plots, rewritten after every batch.
- Errors in the sweep itself (an unknown key, a search space the sampler cannot take, a grid
  larger than n_trials, a study made for another search) are one line, before any trial runs.

Parameters are chosen here, in the one sweeper process, with `study.ask`; each trial gets them
as overrides on its command line (or in its Slurm job), so the ranks of a distributed trial
all run with the same ones. Trial n runs as Hydra job n: its directory is
`<hydra.sweep.dir>/<n>`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from pretrain.config import unknown_key
from pretrain.sweep import results
from pretrain.sweep.schema import PRUNERS, SAMPLERS
from pretrain.sweep.space import SweepError, describe, grid_values, override_value, parse
from pretrain.sweep.study import (
    JOURNAL,
    SweepLock,
    check_same,
    config_of,
    finished,
    instantiate,
    storage,
)
from pretrain.sweep.trial import read_result

log = logging.getLogger(__name__)

STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


class OptunaSweep:
    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        custom_search_space: str | None,
    ) -> None:
        self.sampler_spec, self.pruner_spec = sampler, pruner
        self.direction = getattr(direction, "name", str(direction))
        self.storage_url, self.study_name = storage, study_name
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.max_failure_rate = max_failure_rate
        self.params: dict[str, Any] = (
            dict(OmegaConf.to_container(params)) if params is not None else {}  # type: ignore[arg-type]
        )
        self.custom = get_method(custom_search_space) if custom_search_space else None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()

    # ---- the sweep ------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        self._check_settings()
        space, fixed = parse([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        self._check_keys([*space, *fixed])
        if not space and self.custom is None:
            raise SweepError(
                "error: nothing to search: give parameters as sweeps, e.g. "
                "'optim.lr=tag(log, interval(1e-4, 1e-2))', or in hydra.sweeper.params"
            )
        objective = str(self.config.sweep.objective)
        sampler_cfg = config_of(self.sampler_spec, SAMPLERS, "sampler")
        n_trials, sampler_args = self.n_trials, {}
        if sampler_cfg["_target_"] == "optuna.samplers.GridSampler":
            grid = grid_values(space)
            size = math.prod(len(v) for v in grid.values())
            if size > n_trials:
                raise SweepError(
                    f"error: the grid has {size} points but hydra.sweeper.n_trials={n_trials}: "
                    f"set hydra.sweeper.n_trials={size} to run all of it, or make the grid "
                    "smaller (or use sampler=random/tpe to sample a subset)"
                )
            if size < n_trials:
                log.info(f"The grid has {size} points: n_trials {n_trials} -> {size}")
            n_trials, sampler_args = size, {"search_space": grid}
        sampler = instantiate(sampler_cfg, **sampler_args)
        pruner_cfg = config_of(self.pruner_spec, PRUNERS, "pruner")

        lock = SweepLock(self.sweep_dir)
        try:
            url = self.storage_url or str(self.sweep_dir / JOURNAL)
            name = self.study_name or self.sweep_dir.name
            study = optuna.create_study(
                study_name=name,
                storage=storage(url),
                sampler=sampler,
                pruner=instantiate(pruner_cfg),
                direction=self.direction,  # type: ignore[arg-type]  # checked: minimize/maximize
                load_if_exists=True,
            )
            record = {
                "objective": objective,
                "direction": self.direction,
                "search_space": {k: describe(d) for k, d in space.items()},
                "pruner": pruner_cfg,
            }
            check_same(study, record, url)
            n_before = len(study.get_trials(deepcopy=False))
            if n_before and sampler_cfg.get("seed") is not None:
                # A seeded sampler in a new process starts its stream again: continued with the
                # same seed, it would propose the first trials' parameters once more.
                seed = int(sampler_cfg["seed"]) + n_before
                study.sampler = instantiate({**sampler_cfg, "seed": seed}, **sampler_args)
            self.study, self.space, self.fixed, self.url, self.name = study, space, fixed, url, name
            self.objective = objective
            self._run(n_trials)
        finally:
            lock.release()

    def _run(self, n_trials: int) -> None:
        study = self.study
        log.info(
            f"Study {self.name} in {self.url}: {self.direction} {self.objective}, sampler "
            f"{type(study.sampler).__name__}, pruner {type(study.pruner).__name__}"
        )
        # A RUNNING trial now is one a killed sweep left (the lock says no sweep is running).
        left = [t for t in study.get_trials(deepcopy=False) if not t.state.is_finished()]
        resumed = [t for t in left if not self._record_ended(t)]
        done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        to_go = max(0, n_trials - done - len(resumed))
        if done or resumed:
            log.info(
                f"Continuing: {done} trial(s) done, {len(resumed)} to resume "
                f"({', '.join(str(t.number) for t in resumed) or 'none'}), {to_go} new"
            )
        for batch in _consecutive(resumed, self.n_jobs):
            self._launch(batch, [dict(t.params) for t in batch])
        while to_go > 0:
            size = min(self.n_jobs, to_go)
            trials, params = [], []
            for _ in range(size):
                trial = study.ask(self.space)
                if self.custom is not None:
                    self.custom(self.config, trial)
                trials.append(trial)
                params.append(dict(trial.params))
            self._launch(trials, params)
            to_go -= size
        self._write_results(plots=True)
        best = self._best()
        if best is not None:
            log.info(
                f"Best trial {best.number}: {self.objective} {best.value:.6g} with "
                + " ".join(f"{k}={v}" for k, v in best.params.items())
                + f" (results: {self.sweep_dir / results.CSV})"
            )

    def _launch(self, trials: Sequence[Any], params: Sequence[dict[str, Any]]) -> None:
        """One batch: every trial launched at once (as far as the launcher can), then told."""
        first = trials[0].number
        overrides = [self._overrides(p, t.number) for t, p in zip(trials, params)]
        returns = self.launcher.launch(overrides, initial_job_idx=first)
        failures = []
        for trial, ret in zip(trials, returns):
            error = self._tell(trial.number, ret)
            if error is not None:
                log.warning(f"Trial {trial.number} failed: {error}")
                failures.append(error)
        self._write_results(plots=False)
        if failures and len(failures) / len(returns) > self.max_failure_rate:
            log.error(
                f"{len(failures)} of {len(returns)} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: stopping"
            )
            raise failures[0]

    def _overrides(self, params: dict[str, Any], number: int) -> list[str]:
        # The fixed overrides first: a swept key inside a fixed one (`data.mix.code.weight` in
        # `data.mix={...}`) must be applied after it, as later overrides win.
        out = [line for key, line in self.fixed.items() if key not in params]
        out += [f"{k}={override_value(v)}" for k, v in params.items()]
        out += [
            f"sweep.storage={override_value(self.url)}",
            f"sweep.study_name={override_value(self.name)}",
            f"sweep.trial={number}",
        ]
        return out

    def _tell(self, number: int, ret: JobReturn) -> BaseException | None:
        """Record a finished job in the study; returns its error, if it failed."""
        value = ret._return_value
        if ret.status == JobStatus.COMPLETED:
            try:
                self._tell_state(number, TrialState.COMPLETE, float(value))
                return None
            except (TypeError, ValueError):
                error: BaseException = SweepError(
                    f"error: trial {number} returned {value!r}, not a number"
                )
        elif isinstance(value, optuna.TrialPruned):
            self._tell_state(number, TrialState.PRUNED)
            log.info(f"Trial {number} pruned: {value}")
            return None
        else:
            error = value if isinstance(value, BaseException) else SweepError(str(value))
        self._tell_state(number, TrialState.FAIL)
        return error

    def _tell_state(self, number: int, state: TrialState, value: float | None = None) -> None:
        if finished(self.study, number):  # the trial recorded its own result (trial.finish)
            return
        try:
            self.study.tell(number, value if state == TrialState.COMPLETE else None, state=state)
        except RuntimeError as e:
            # The grid sampler stops the study when its grid is done, which Optuna only allows
            # inside `optimize`: the trial is recorded all the same.
            if "Study.stop" not in str(e):
                raise

    def _record_ended(self, trial: Any) -> bool:
        """A left-over trial whose run had ended before the sweep was killed: record its
        result.json (True); False when it has to run (again)."""
        run_dir = trial.user_attrs.get("run_dir")
        result = read_result(run_dir) if run_dir else None
        if result is None or result.trial != trial.number:
            return False
        if result.state == "pruned":
            self._tell_state(trial.number, TrialState.PRUNED)
        else:
            self._tell_state(trial.number, TrialState.COMPLETE, result.value)
        log.info(f"Trial {trial.number} had ended ({result.state}): recorded from {run_dir}")
        return True

    # ---- results --------------------------------------------------------------------------
    def _best(self) -> Any:
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return self.study.best_trial if complete else None

    def _write_results(self, plots: bool) -> None:
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            value = t.value
            if value is None and t.intermediate_values:
                value = t.intermediate_values[max(t.intermediate_values)]  # where it was pruned
            row = results.Row(
                t.number,
                STATE_NAMES.get(t.state, t.state.name.lower()),
                dict(t.params),
                value,
                run_dir=str(t.user_attrs.get("run_dir", "")),
            )
            rows.append(results.with_result(row))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        results.write_csv(self.sweep_dir, rows, self.objective)
        best = self._best()
        if best is not None:
            results.write_best(self.sweep_dir, dict(best.params), float(best.value))
        if plots:
            results.plot(self.study, self.sweep_dir, self.objective)

    # ---- checks before anything runs -------------------------------------------------------
    def _check_settings(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise SweepError(
                f"error: hydra.sweeper.direction={self.direction}: a trial returns one objective "
                "(sweep.objective), so use minimize or maximize"
            )
        if self.n_trials < 1 or self.n_jobs < 1:
            raise SweepError(
                f"error: hydra.sweeper.n_trials={self.n_trials} and n_jobs={self.n_jobs} must be "
                "at least 1"
            )
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise SweepError(
                f"error: hydra.sweeper.max_failure_rate={self.max_failure_rate} is a fraction: "
                "use a number from 0 to 1"
            )

    def _check_keys(self, keys: Sequence[str]) -> None:
        for key in keys:
            if key.lstrip("+~").startswith(("hydra.", "hydra/")) or "/" in key:
                continue
            problem = unknown_key(key.split("@")[0])
            if problem is not None:
                first, _, rest = problem.partition("\n")
                raise SweepError(f"error: sweep parameter: {first} {rest}")


def _consecutive(trials: Sequence[Any], size: int) -> list[list[Any]]:
    """Batches of at most `size` trials with consecutive numbers (a launch numbers its jobs
    from its first one: trial n must be job n)."""
    batches: list[list[Any]] = []
    for t in sorted(trials, key=lambda t: t.number):
        if batches and len(batches[-1]) < size and batches[-1][-1].number + 1 == t.number:
            batches[-1].append(t)
        else:
            batches.append([t])
    return batches
