"""Hyperparameter sweeps through the CLI (`python -m pretrain.train -m ...`) on the test corpus.

Hydra's basic sweeper (a grid), the Optuna sweeper (grid, random, TPE) with its pruner, a sweep
killed in the middle of a trial and continued, distributed trials (hydra/launcher=torchrun), and
bad sweeps that must stop with one line. Trials are the debug model for 20 steps: what is
checked is what the sweep does with them, not how good they get.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from pretrain.metrics import read_metrics
from pretrain.sweep.results import CSV
from pretrain.sweep.study import storage
from tests.conftest import REPO, test_env, torchrun
from tests.wandb_offline import find_offline_runs, read_run_info

OPTUNA = ("hydra/sweeper=optuna",)


def sweep_cli(
    sweep_dir: Path, data: Path, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "pretrain.train", "-m", "experiment=debug", f"data.dir={data}",
        f"hydra.sweep.dir={sweep_dir}", *overrides,
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=env or test_env(), capture_output=True, text=True, timeout=600
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The sweep stopped with exactly one error line and no traceback; returns the line."""
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def load_study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(
        study_name=sweep_dir.name, storage=storage(str(sweep_dir / "study.journal"))
    )


def csv_rows(sweep_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(sweep_dir / CSV) as f:
        return list(csv.DictReader(f))


def last_val_loss(run_dir: Path) -> float:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]


def is_png(path: Path) -> bool:
    head = path.read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    return head[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100


@pytest.mark.timeout(300)
def test_basic_grid_gives_every_trial_its_own_run(tiny_data: Path, tmp_path: Path) -> None:
    """Hydra's basic sweeper: one run per value, in its own directory with its own checkpoints
    and W&B run, the runs in one W&B group; results.csv and plots from the callback. (A second,
    different sweep in the same directory is refused: tests/unit/test_sweep_parts.py.)"""
    sweep = tmp_path / "grid"
    out = ok(sweep_cli(sweep, tiny_data, "optim.lr=1e-5,3e-3", "logging.wandb=true"))
    assert "resumed from" not in out.stdout  # the second trial did not take the first's state
    groups, ids = set(), set()
    for num, lr in ((0, 1e-5), (1, 3e-3)):
        run = sweep / str(num)
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == lr
        assert (run / "checkpoints" / "step_0000020" / "COMPLETE").is_file()
        assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 21))
        info = read_run_info(find_offline_runs(run / "wandb")[0])
        groups.add(info["group"])
        ids.add(info["run_id"])
        assert info["display_name"] == f"debug-{num}"
    assert groups == {"grid"} and len(ids) == 2
    rows = csv_rows(sweep)
    assert [(r["trial"], r["state"], float(r["optim.lr"])) for r in rows] == [
        ("0", "complete", 1e-5),
        ("1", "complete", 3e-3),
    ]
    assert float(rows[1]["val_loss"]) == last_val_loss(sweep / "1")
    assert is_png(sweep / "history.png") and is_png(sweep / "params.png")
    assert yaml.safe_load((sweep / "0" / "trial.yaml").read_text())["overrides"] == [
        "experiment=debug",
        f"data.dir={tiny_data}",
        "optim.lr=1e-05",
        "logging.wandb=True",  # as Hydra's basic sweeper writes the job's overrides
    ]


@pytest.mark.timeout(300)
def test_optuna_grid_picks_the_better_learning_rate(tiny_data: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "lr"
    ok(
        sweep_cli(
            sweep,
            tiny_data,
            *OPTUNA,
            "hydra.sweeper.sampler=grid",
            "hydra.sweeper.pruner=none",
            "hydra.sweeper.n_trials=2",
            "optim.lr=choice(1e-5,3e-3)",
        )  # fmt: skip
    )
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    assert best["best_params"] == {"optim.lr": 3e-3}
    study = load_study(sweep)
    assert sorted(t.params["optim.lr"] for t in study.trials) == [1e-5, 3e-3]
    for t in study.trials:
        run = sweep / str(t.number)
        assert t.state == optuna.trial.TrialState.COMPLETE
        # The objective is the run's final validation loss, and the parameter is in its config.
        assert t.value == last_val_loss(run)
        assert (
            yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == t.params["optim.lr"]
        )
    assert best["best_value"] == min(t.value for t in study.trials)
    rows = csv_rows(sweep)
    assert len(rows) == 2 and all(r["steps"] == "20" and r["tokens"] == "5120" for r in rows)
    for name in ("history.png", "params.png", "intermediate.png"):
        assert is_png(sweep / name), name


@pytest.mark.timeout(300)
def test_tpe_improves_on_its_first_trial(tiny_data: Path, tmp_path: Path) -> None:
    """Six trials, three of them TPE's (after three random ones): the best beats the first."""
    sweep = tmp_path / "tpe"
    out = ok(
        sweep_cli(
            sweep,
            tiny_data,
            *OPTUNA,
            "hydra.sweeper.sampler.seed=0",
            "hydra.sweeper.sampler.n_startup_trials=3",
            "hydra.sweeper.n_jobs=1",
            "hydra.sweeper.n_trials=6",
            "optim.lr=tag(log,interval(1e-5,1e-2))",
        )  # fmt: skip
    )
    assert "sampler TPESampler" in out.stdout + out.stderr
    study = load_study(sweep)
    assert len(study.trials) == 6
    assert all(t.state.is_finished() for t in study.trials)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert study.best_value < first.value, [(t.params, t.value) for t in study.trials]
    assert all(1e-5 <= t.params["optim.lr"] <= 1e-2 for t in study.trials)


@pytest.mark.timeout(300)
def test_a_clearly_worse_trial_is_pruned(tiny_data: Path, tmp_path: Path) -> None:
    """The median pruner, allowed to act after one finished trial: a learning rate of 1e-5,
    run after 3e-3, is worse at its first validation (step 5) and stops there, recorded as
    pruned, and the sweep goes on."""
    sweep = tmp_path / "prune"
    ok(
        sweep_cli(
            sweep,
            tiny_data,
            *OPTUNA,
            "hydra/sweeper/sampler=grid",
            # Seed 1 orders this grid 3e-3 first (checked below, so the test cannot pass idle).
            "hydra.sweeper.sampler.seed=1",
            "hydra.sweeper.pruner.n_startup_trials=1",
            "hydra.sweeper.n_trials=2",
            "optim.lr=choice(3e-3,1e-5)",
            "train.eval_every=5",
        )  # fmt: skip
    )
    study = load_study(sweep)
    first, second = study.trials
    assert (first.params["optim.lr"], second.params["optim.lr"]) == (3e-3, 1e-5)
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert second.state == optuna.trial.TrialState.PRUNED
    assert sorted(second.intermediate_values) == [5]
    result = json.loads((sweep / "1" / "result.json").read_text())
    assert result["state"] == "pruned" and result["step"] == 5
    assert max(r["step"] for r in read_metrics(sweep / "1")) == 5
    assert [r["state"] for r in csv_rows(sweep)] == ["complete", "pruned"]


@pytest.mark.timeout(400)
def test_killed_sweep_continues_where_it_stopped(tiny_data: Path, tmp_path: Path) -> None:
    """The sweep's process is killed (SIGKILL) at step 15 of its second trial, after that
    trial's checkpoint at step 10. The same command again finishes the study: the first trial
    is not run again, the second resumes from its own checkpoint, a third is added, and the
    study holds three trials, each counted once."""
    sweep = tmp_path / "kill"
    args = (
        *OPTUNA, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_jobs=1", "hydra.sweeper.n_trials=3",
        "optim.lr=tag(log,interval(1e-4,1e-2))",
    )  # fmt: skip
    # Trial 0 makes 20 micro-steps in this process; the 35th is trial 1's step 15.
    killed = sweep_cli(
        sweep, tiny_data, *args, env=test_env(PRETRAIN_FAILPOINT="train.micro_step@35")
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    states = [t.state for t in load_study(sweep).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]
    first_metrics = (sweep / "0" / "metrics.jsonl").read_text()

    out = ok(sweep_cli(sweep, tiny_data, *args))
    assert f"resumed from {sweep / '1' / 'checkpoints' / 'step_0000010'} (step 10)" in out.stdout
    assert "#0 :" not in out.stdout + out.stderr  # trial 0 was not launched again
    assert (sweep / "0" / "metrics.jsonl").read_text() == first_metrics
    study = load_study(sweep)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.trials[1].value == last_val_loss(sweep / "1")
    # A seeded sampler continued in a new process does not propose the first trials again.
    assert len({t.params["optim.lr"] for t in study.trials}) == 3
    assert [r["state"] for r in csv_rows(sweep)] == ["complete"] * 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (("optim.lrr=tag(log,interval(1e-4,1e-2))",), "unknown config key 'optim.lrr'"),
        (
            ("hydra.sweeper.sampler=grid", "optim.lr=interval(1e-4,1e-2)"),
            "grid needs a finite set of values, but optim.lr is continuous",
        ),
        (
            ("hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=4",
             "optim.lr=choice(1e-4,1e-3,1e-2)", "schedule.name=choice(cosine,wsd)"),
            "the grid has 6 points but hydra.sweeper.n_trials=4",
        ),
    ],
    ids=["unknown-key", "grid-of-interval", "grid-over-n_trials"],
)  # fmt: skip
def test_bad_sweep_stops_with_one_line(
    tiny_data: Path, tmp_path: Path, overrides: tuple[str, ...], expect: str
) -> None:
    proc = sweep_cli(tmp_path / "bad", tiny_data, *OPTUNA, *overrides)
    line = one_line_error(proc)
    assert expect in line, line
    assert not (tmp_path / "bad" / "0").exists()  # refused before any trial ran


@pytest.mark.timeout(400)
def test_distributed_trials_take_their_parameters_from_the_sweeper(
    tiny_data: Path, tmp_path: Path
) -> None:
    """hydra/launcher=torchrun: each trial is one torchrun job of 2 processes, with the
    parameters the one sweeper chose. A sweep started under torchrun itself (a sweeper per
    rank) is refused."""
    sweep = tmp_path / "ddp"
    ok(
        sweep_cli(
            sweep,
            tiny_data,
            *OPTUNA,
            "hydra/launcher=torchrun",
            "hydra.launcher.nproc_per_node=2",
            "hydra.sweeper.sampler=random",
            "hydra.sweeper.n_trials=2",
            "train.max_steps=6",
            "optim.lr=tag(log,interval(1e-4,1e-2))",
        )  # fmt: skip
    )
    study = load_study(sweep)
    assert len(study.trials) == 2  # one trial per launch, not one per rank
    for t in study.trials:
        run = sweep / str(t.number)
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.value == last_val_loss(run)
        state = json.loads((run / "checkpoints" / "step_0000006" / "train_state.json").read_text())
        assert state["world_size"] == 2
        assert (
            yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == t.params["optim.lr"]
        )
        result = json.loads((run / "result.json").read_text())
        assert result["tokens"] == 6 * 2 * 4 * 64  # steps x ranks x micro_batch x seq_len
    assert not math.isclose(study.trials[0].params["optim.lr"], study.trials[1].params["optim.lr"])

    proc = torchrun(
        2,
        ["-m", "pretrain.train", "-m", "experiment=debug", f"data.dir={tiny_data}",
         f"hydra.sweep.dir={tmp_path / 'per-rank'}", *OPTUNA, "optim.lr=interval(1e-4,1e-2)"],
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "error: a sweep (-m) runs in one process" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "per-rank").exists()
