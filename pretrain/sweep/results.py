"""What a sweep leaves to read: results.csv, optimization_results.yaml and PNG plots.

    results.csv                  one row per trial: trial, state, each parameter, the objective,
                                 steps, tokens, wall_s, run_dir
    optimization_results.yaml    name, best_params, best_value (Hydra's Optuna sweeper's format)
    history.png                  the objective of every trial in order, and the best so far
    params.png                   each parameter against the objective
    intermediate.png             every trial's validation curve as the pruner saw it (Optuna)

The plots are Optuna's (optuna.visualization.matplotlib), also for Hydra's basic sweeper, whose
trials are put in a study in memory for the purpose. Files are replaced whole (written aside,
then renamed), so a sweep killed at any moment leaves the previous version readable.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pretrain.sweep.trial import RESULT_FILE, TRIAL_FILE, read_result

CSV = "results.csv"
BEST = "optimization_results.yaml"
PLOTS = ("history.png", "params.png", "intermediate.png")


@dataclass
class Row:
    """One trial, as results.csv shows it."""

    trial: int
    state: str
    params: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    step: int | None = None
    tokens: int | None = None
    wall_s: float | None = None
    run_dir: str = ""


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def with_result(row: Row) -> Row:
    """Fill steps, tokens and wall time in from the trial's result.json."""
    result = read_result(row.run_dir) if row.run_dir else None
    if result is not None:
        row.step, row.tokens, row.wall_s = result.step, result.tokens, round(result.wall_s, 2)
        if row.value is None:
            row.value = result.value
    return row


def write_csv(sweep_dir: Path, rows: Sequence[Row], objective: str) -> Path:
    params: list[str] = []
    for row in rows:
        params += [k for k in row.params if k not in params]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "state", *params, objective, "steps", "tokens", "wall_s", "run_dir"])
    for r in sorted(rows, key=lambda r: r.trial):
        values = [r.params.get(k, "") for k in params]
        writer.writerow(
            [r.trial, r.state, *values, "" if r.value is None else r.value]
            + ["" if v is None else v for v in (r.step, r.tokens, r.wall_s)]
            + [r.run_dir]
        )
    path = Path(sweep_dir) / CSV
    _replace(path, out.getvalue())
    return path


def write_best(sweep_dir: Path, best_params: dict[str, Any], best_value: float) -> Path:
    import yaml

    path = Path(sweep_dir) / BEST
    text = yaml.safe_dump(
        {"name": "optuna", "best_params": best_params, "best_value": best_value},
        sort_keys=False,
    )
    _replace(path, text)
    return path


def plot(study: Any, sweep_dir: Path, objective: str) -> list[Path]:
    """Optuna's optimisation history, slice plot (each parameter against the objective) and
    intermediate values, as PNGs in the sweep directory. A plot that cannot be drawn is left
    out with a warning: it must not fail a sweep."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    # matplotlib logs a line for every categorical axis of numbers-as-strings
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)

    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    drawers: dict[str, Any] = {}
    if complete:
        drawers["history.png"] = lambda: ovm.plot_optimization_history(study, target_name=objective)
        if any(t.params for t in complete):
            drawers["params.png"] = lambda: ovm.plot_slice(study, target_name=objective)
    if any(t.intermediate_values for t in done):
        drawers["intermediate.png"] = lambda: ovm.plot_intermediate_values(study)
    written = []
    for name, draw in drawers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" notices, empty-axis warnings
                axes = draw()
            many = list(axes.flat) if hasattr(axes, "flat") else [axes]
            fig = many[0].figure
            # Room for every parameter's panel, the colour bar and the legend.
            fig.set_size_inches(max(8.0, 3.6 * len(many) + 2.5), 4.8)
            fig.savefig(Path(sweep_dir) / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(Path(sweep_dir) / name)
        except Exception as e:  # noqa: BLE001 - a plot must not fail a sweep
            print(f"warning: no {name} ({type(e).__name__}: {e})", flush=True)
    return written


# ---- Hydra's basic sweeper: results gathered from the trials' directories -----------------------


def rows_from_run_dirs(sweep_dir: Path, swept: Sequence[str]) -> list[Row]:
    """A row per trial directory of a basic sweep; `swept` names the parameters."""
    import yaml

    rows: list[Row] = []
    for trial_file in sorted(Path(sweep_dir).glob(f"*/{TRIAL_FILE}")):
        run_dir = trial_file.parent
        overrides = (yaml.safe_load(trial_file.read_text()) or {}).get("overrides", [])
        values = dict(o.split("=", 1) for o in overrides if "=" in o)
        params = {k: _number(values[k]) for k in swept if k in values}
        result = read_result(run_dir)
        state = result.state if result is not None else "failed"
        number = int(run_dir.name) if run_dir.name.isdigit() else len(rows)
        rows.append(with_result(Row(number, state, params, run_dir=str(run_dir))))
    return rows


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def study_of(rows: Sequence[Row], direction: Literal["minimize", "maximize"] = "minimize") -> Any:
    """An in-memory Optuna study holding `rows` (for Optuna's plots of a basic sweep). Numeric
    parameters get a numeric axis (a log one when they span two decades), others categories."""
    import optuna

    from pretrain.sweep.study import quiet_optuna

    quiet_optuna()
    study = optuna.create_study(direction=direction)
    keys = {k for r in rows for k in r.params}
    dists = {k: _axis([r.params[k] for r in rows if k in r.params]) for k in keys}
    for r in rows:
        state = {
            "complete": optuna.trial.TrialState.COMPLETE,
            "pruned": optuna.trial.TrialState.PRUNED,
        }.get(r.state, optuna.trial.TrialState.FAIL)
        study.add_trial(
            optuna.trial.create_trial(
                params=r.params,
                distributions={k: dists[k] for k in r.params},
                value=r.value if state == optuna.trial.TrialState.COMPLETE else None,
                state=state,
            )
        )
    return study


def _axis(values: Sequence[Any]) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    low, high = (min(values), max(values)) if numeric else (0, 0)
    if not numeric or low == high:
        return CategoricalDistribution(sorted(set(values), key=str))
    log = low > 0 and high / low >= 100
    if all(isinstance(v, int) for v in values):
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(float(low), float(high), log=log)


__all__ = ["BEST", "CSV", "PLOTS", "RESULT_FILE", "Row", "plot", "write_best", "write_csv"]
