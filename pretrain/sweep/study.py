"""An Optuna study in a file next to the sweep: storage, sampler, pruner, and continuing it.

The study is kept in Optuna's journal format (`JournalStorage` over `JournalFileBackend`): an
append-only log that survives a kill at any moment and needs no database server; several
processes (the sweeper, the trials' rank 0, Slurm jobs on a shared filesystem) append to it
under a file lock. A database URL (`hydra.sweeper.storage=sqlite:///study.db`) works too.

What a study was created for is recorded in its user attributes (the objective, the direction,
the search space, the pruner's config), so that a later command that asks for something else is
refused instead of mixing two searches in one study, and so that each trial builds the same
pruner as the study's (a pruner is not stored by Optuna: it is an object of the process).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from pretrain.sweep.lock import DirLock
from pretrain.sweep.space import SweepError

JOURNAL = "study.journal"
LOCK = ".sweep.lock"


def quiet_optuna() -> None:
    """Optuna logs every trial and every study it creates at INFO; the sweeper says what
    matters itself."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


quiet_optuna()


def storage(url: str) -> Any:
    """A journal file for a path, Optuna's RDB storage for a URL (`sqlite:///...`)."""
    if "://" in url:
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(url)))


def build(spec: Any, table: Mapping[str, type], what: str, **extra: Any) -> Any:
    """A sampler or pruner from its config (`{_target_: ..., ...}`) or its name."""
    return instantiate(config_of(spec, table, what), **extra)


def config_of(spec: Any, table: Mapping[str, type], what: str) -> dict[str, Any]:
    """The plain config of a sampler or pruner given by name or by config."""
    from dataclasses import asdict

    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, str):
        if spec not in table:
            raise SweepError(
                f"error: hydra.sweeper.{what}={spec} is not one of: {', '.join(table)}"
            )
        return asdict(table[spec]())
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise SweepError(f"error: hydra.sweeper.{what} must be a name or a config with _target_")
    return dict(spec)


def instantiate(config: Mapping[str, Any], **extra: Any) -> Any:
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(dict(config), **extra)


def open_trial(storage_url: str, study_name: str, number: int) -> optuna.trial.Trial:
    """Trial `number` of a stored study, with the study's pruner: what a training run reports
    its validation losses to."""
    store = optuna.storages.get_storage(storage(storage_url))
    study_id = store.get_study_id_from_name(study_name)
    pruner = store.get_study_user_attrs(study_id).get("pruner") or {
        "_target_": "optuna.pruners.NopPruner"
    }
    study = optuna.load_study(
        study_name=study_name,
        storage=store,
        sampler=optuna.samplers.RandomSampler(),  # never asked: the trial's parameters are set
        pruner=instantiate(pruner),
    )
    return optuna.trial.Trial(
        study, store.get_trial_id_from_study_id_trial_number(study_id, number)
    )


def tell(storage_url: str, study_name: str, number: int, state: str, value: float) -> None:
    """Record a trial's end (complete with `value`, or pruned) in its study, unless it is
    recorded already."""
    study = optuna.load_study(
        study_name=study_name, storage=storage(storage_url), sampler=optuna.samplers.RandomSampler()
    )
    if finished(study, number):
        return
    if state == "pruned":
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(number, value)


def finished(study: optuna.Study, number: int) -> bool:
    return any(t.number == number and t.state.is_finished() for t in study.get_trials(False))


def check_same(study: optuna.Study, record: Mapping[str, Any], where: str) -> None:
    """Refuse to continue a study created for another search (see the module docstring)."""
    stored = {k: study.user_attrs[k] for k in record if k in study.user_attrs}
    if not stored:
        for key, value in record.items():
            study.set_user_attr(key, value)
        return
    for key in ("objective", "direction", "search_space"):
        if key in stored and stored[key] != record[key]:
            raise SweepError(
                f"error: the study in {where} was made for {key} {stored[key]}, this command asks "
                f"for {record[key]}: repeat its command to continue it, or start a new sweep "
                "with hydra.sweep.dir=<dir> (or another run.name or hydra.sweeper.study_name)"
            )
    if stored.get("pruner") != record.get("pruner"):
        study.set_user_attr("pruner", record["pruner"])  # a new pruner applies from now on


class SweepLock:
    """One sweeper per sweep directory: an exclusive lock on `<sweep dir>/.sweep.lock`, released
    by the kernel when the sweep ends or is killed. So a RUNNING trial found at start belongs to
    a sweep that was killed, and is continued, not raced."""

    def __init__(self, sweep_dir: Path) -> None:
        self.lock = DirLock(sweep_dir / LOCK)
        holder = self.lock.acquire()
        if holder is not None:
            raise SweepError(
                f"error: {sweep_dir} is in use by another sweep ({holder}): wait for it to end, "
                "or start this one elsewhere with hydra.sweep.dir=<dir>"
            )

    def release(self) -> None:
        self.lock.release()
