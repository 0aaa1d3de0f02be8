"""Config schemas of `hydra/sweeper=optuna` and `hydra/launcher=torchrun`, and `register`, which
puts them in Hydra's ConfigStore (the plugins in hydra_plugins/pretrain_sweep call it as Hydra
loads them).

The sweeper keeps the interface of Hydra's own Optuna sweeper (hydra-optuna-sweeper 1.2): the
same keys (`direction`, `storage`, `study_name`, `n_trials`, `n_jobs`, `max_failure_rate`,
`params`, `custom_search_space`), the same `hydra/sweeper/sampler` group (tpe, random, grid,
cmaes, nsgaii, qmc; gp added), and the same search-space syntax. Added: the `hydra/sweeper/pruner`
group (median by default; none turns pruning off), and the shorthand `hydra.sweeper.sampler=random`
(a name selects that sampler with its defaults; the group form `hydra/sweeper/sampler=random`
lets you set its options too, e.g. `hydra.sweeper.sampler.seed=0`).

The `_target_`s of the sweeper and the launcher name their classes in hydra_plugins: Hydra only
instantiates plugins from that package, and only classes it found there at start-up.
"""

# OmegaConf reads these dataclass annotations at run time to type the configs: they are
# evaluated (no `from __future__ import annotations`) and keep typing's spelling (Optional, List,
# Dict), which every OmegaConf version reads.
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Direction(Enum):
    minimize = 1
    maximize = 2


# ---- samplers (https://optuna.readthedocs.io/en/stable/reference/samplers/index.html) ----------


@dataclass
class SamplerConfig:
    _target_: str = MISSING
    seed: Optional[int] = None


@dataclass
class TPESamplerConfig(SamplerConfig):
    """Tree-structured Parzen estimator: Bayesian optimisation after `n_startup_trials` random
    trials."""

    _target_: str = "optuna.samplers.TPESampler"
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    constant_liar: bool = True


@dataclass
class RandomSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConfig(SamplerConfig):
    """Every combination of the (discrete) search space, in a random order; the sweeper fills in
    the grid."""

    _target_: str = "optuna.samplers.GridSampler"


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.CmaEsSampler"
    n_startup_trials: int = 1
    sigma0: Optional[float] = None
    restart_strategy: Optional[str] = None
    popsize: Optional[int] = None
    use_separable_cma: bool = False
    consider_pruned_trials: bool = False


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.NSGAIISampler"
    population_size: int = 50
    mutation_prob: Optional[float] = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class QMCSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.QMCSampler"
    qmc_type: str = "sobol"
    scramble: bool = False


@dataclass
class GPSamplerConfig(SamplerConfig):
    """Gaussian-process Bayesian optimisation (good for a handful of continuous parameters)."""

    _target_: str = "optuna.samplers.GPSampler"
    n_startup_trials: int = 10
    deterministic_objective: bool = False


SAMPLERS: dict[str, type[SamplerConfig]] = {
    "tpe": TPESamplerConfig,
    "random": RandomSamplerConfig,
    "grid": GridSamplerConfig,
    "cmaes": CmaEsSamplerConfig,
    "nsgaii": NSGAIISamplerConfig,
    "qmc": QMCSamplerConfig,
    "gp": GPSamplerConfig,
}


# ---- pruners: stop trials whose intermediate validation losses are clearly worse ----------------


@dataclass
class MedianPrunerConfig:
    """Stop a trial whose value at a step is worse than the median of earlier trials' values at
    that step, once `n_startup_trials` trials have finished and after `n_warmup_steps` steps."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class PercentilePrunerConfig:
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class HyperbandPrunerConfig:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class SuccessiveHalvingPrunerConfig:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class NopPrunerConfig:
    """No pruning: every trial runs to the end."""

    _target_: str = "optuna.pruners.NopPruner"


PRUNERS: dict[str, type] = {
    "median": MedianPrunerConfig,
    "percentile": PercentilePrunerConfig,
    "hyperband": HyperbandPrunerConfig,
    "successive_halving": SuccessiveHalvingPrunerConfig,
    "none": NopPrunerConfig,
}


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.pretrain_sweep.optuna_sweeper.OptunaSweeper"
    # The sampler and pruner nodes reach the sweeper as configs: it builds them itself (the grid
    # sampler needs the search space, and the trials need the pruner's config).
    _recursive_: bool = False
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])

    sampler: Any = MISSING
    """A `hydra/sweeper/sampler` config, or a sampler's name (tpe, random, grid, ...)."""
    pruner: Any = MISSING
    """A `hydra/sweeper/pruner` config, or a pruner's name (median, ..., none)."""
    direction: Direction = Direction.minimize
    """minimize or maximize the trial's result (sweep.objective: val_loss by default)."""
    storage: Optional[str] = None
    """Where the study lives: a journal file (default: study.journal in the sweep dir) or a
    database URL (sqlite:///study.db)."""
    study_name: Optional[str] = None
    """The study's name (default: the sweep dir's name)."""
    n_trials: int = 20
    """Trials in total: re-running the command continues the study up to this many."""
    n_jobs: int = 2
    """Trials launched at once (concurrent on Slurm; the basic launcher runs them in turn)."""
    max_failure_rate: float = 0.0
    """Stop the sweep when more than this fraction of a batch's trials fail."""
    params: Optional[Dict[str, str]] = None
    """The search space, as overrides: {optim.lr: "tag(log, interval(1e-4, 1e-2))"}."""
    custom_search_space: Optional[str] = None
    """A function `f(cfg, trial)` that suggests further parameters with Optuna's API."""


@dataclass
class TorchrunLauncherConf:
    """Run each trial as `torchrun --standalone --nproc-per-node N -m pretrain.train ...`, one
    trial after another: parameters are chosen once, in the sweeper, and every rank of a trial
    gets the same ones on its command line."""

    _target_: str = "hydra_plugins.pretrain_sweep.torchrun_launcher.TorchrunLauncher"
    nproc_per_node: int = 2
    """Processes per trial."""
    module: str = "pretrain.train"
    """The training module every process runs."""
    python: str = ""
    """The interpreter (default: the sweep's own)."""


def register() -> None:
    """Store the sweeper's, samplers', pruners' and launcher's schemas in Hydra's ConfigStore,
    where `hydra/sweeper=optuna`, `hydra/sweeper/sampler=...`, `hydra/sweeper/pruner=...` and
    `hydra/launcher=torchrun` find them. Storing them again replaces them with the same."""
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="pretrain")
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="pretrain")
    for name, node in PRUNERS.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="pretrain")
    cs.store(
        group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="pretrain"
    )
