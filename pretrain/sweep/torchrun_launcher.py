"""`hydra/launcher=torchrun`: each trial of a sweep as one torchrun job on this machine.

    python -m pretrain.train -m hydra/sweeper=optuna hydra/launcher=torchrun \\
        hydra.launcher.nproc_per_node=4 'optim.lr=tag(log, interval(1e-4, 1e-2))' ...

A sweeper that ran inside every rank would choose different parameters on each (each rank has
its own sampler): here the sweeper runs once, in this process, and each trial is started as
`torchrun --standalone --nproc-per-node N -m pretrain.train <its overrides>`, so every rank of
a trial reads the same parameters from the same command line. Trials run one after another
(each one has the machine). The trial's result comes back through its result.json
(`pretrain.sweep.trial`), since a torchrun job has no return value.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from pretrain.sweep.space import override_value
from pretrain.sweep.trial import TrialFailed, read_result, returned, trial_settings

log = logging.getLogger(__name__)


class TorchrunLaunch:
    def __init__(self, nproc_per_node: int, module: str, python: str) -> None:
        self.nproc, self.module, self.python = nproc_per_node, module, python or sys.executable

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} trial(s), {self.nproc} processes each")
        returns = []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            loader = self.hydra_context.config_loader
            job_cfg = loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_cfg):
                job_cfg.hydra.job.id = f"torchrun_{num}"
                job_cfg.hydra.job.num = num
            # run_job gives the trial its output dir (hydra.sweep.dir/subdir) and its JobReturn;
            # the "task" it runs is the torchrun job.
            returns.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=self._run_trial,
                    config=job_cfg,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                    configure_logging=False,  # the trial's processes log for themselves
                )
            )
        return returns

    def _run_trial(self, cfg: DictConfig) -> Any:
        hc = HydraConfig.get()
        placement = trial_settings(cfg, hc.runtime.output_dir, hc.sweep.dir, int(hc.job.num))
        cmd = [
            self.python, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={self.nproc}", "-m", self.module,
            *hc.overrides.task, *(f"{k}={override_value(v)}" for k, v in placement.items()),
        ]  # fmt: skip
        # The trial's output goes where the sweep's goes (inherited stdout and stderr).
        code = subprocess.run(cmd, check=False).returncode
        run_dir = Path(placement["run.dir"])
        result = read_result(run_dir) if code == 0 else None
        if result is None:
            raise TrialFailed(
                f"error: trial {hc.job.num}: torchrun exited {code}"
                + ("" if code else " without a result.json")
                + f" (its messages are above; run dir {run_dir})"
            )
        return returned(result)
