"""`hydra/sweeper=optuna`: random, grid and Bayesian search with a current Optuna.

The implementation is `pretrain.sweep.optuna_sweeper.OptunaSweep`, imported when a sweep
starts (not when Hydra scans its plugins at every start-up).
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from pretrain.sweep.schema import register

# Hydra imports this module when it scans its plugins, before it composes a config: so the
# schemas are in its ConfigStore when `hydra/sweeper=optuna` or `hydra/launcher=torchrun` is
# looked up.
register()


class OptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from pretrain.sweep.optuna_sweeper import OptunaSweep

        self.sweep_impl = OptunaSweep(**kwargs)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweep_impl.setup(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        self.sweep_impl.sweep(arguments)
