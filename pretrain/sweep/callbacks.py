"""Results of a sweep by Hydra's basic sweeper, which knows nothing of them.

`conf/config.yaml` registers `SweepResults` as a Hydra callback. When a basic sweep
(`-m optim.lr=1e-4,3e-4`) ends, it gathers every trial's result.json from the sweep directory
into results.csv and plots, as the Optuna sweeper does after each batch (it writes its own, from
its study, so this callback leaves Optuna sweeps alone). Hydra turns an exception in a callback
into a warning: a failure here never fails the sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepResults(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower():
            return
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from pretrain.sweep import results

        sweep_dir = Path(str(config.hydra.sweep.dir))
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
        rows = results.rows_from_run_dirs(sweep_dir, swept)
        if not rows:
            return
        objective = str(config.sweep.objective)
        results.write_csv(sweep_dir, rows, objective)
        results.plot(results.study_of(rows), sweep_dir, objective)
