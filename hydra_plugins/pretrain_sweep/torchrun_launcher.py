"""`hydra/launcher=torchrun`: every trial of a sweep on several processes of this machine.

The implementation is `pretrain.sweep.torchrun_launcher`, imported when a sweep starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from pretrain.sweep.schema import register

# At Hydra's plugin scan, as in optuna_sweeper.py: either plugin, loaded alone, registers both.
register()


class TorchrunLauncher(Launcher):
    def __init__(self, **kwargs: Any) -> None:
        from pretrain.sweep.torchrun_launcher import TorchrunLaunch

        self.launch_impl = TorchrunLaunch(**kwargs)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.launch_impl.setup(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        return self.launch_impl.launch(job_overrides, initial_job_idx)
