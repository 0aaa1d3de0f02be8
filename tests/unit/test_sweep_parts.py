"""The sweep's parts that need no training run: search-space syntax, grids, override values,
trial identity, Slurm ranks, results.csv, failpoint counting."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pretrain.config import ConfigError
from pretrain.engine.process_group import adopt_slurm_tasks
from pretrain.sweep import results
from pretrain.sweep.lock import DirLock
from pretrain.sweep.optuna_sweeper import OptunaSweep
from pretrain.sweep.space import SweepError, describe, grid_values, override_value, parse
from pretrain.sweep.trial import TrialResult, claim, write_result
from tests.conftest import REPO, test_env


def test_search_space_reads_hydras_sweep_syntax() -> None:
    space, fixed = parse(
        [
            "optim.lr=tag(log, interval(1e-4, 1e-2))",
            "model.dropout=interval(0, 0.2)",
            "model.n_layer=int(interval(2, 8))",
            "train.micro_batch=choice(4, 8, 16)",
            "model.n_head=range(2, 9, 2)",
            "schedule.name=choice(cosine, wsd)",
            "optim.beta2=0.99",
            "+extra.key=3",
        ]
    )
    assert space["optim.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.dropout"] == FloatDistribution(0.0, 0.2)
    assert space["model.n_layer"] == IntDistribution(2, 8)
    assert space["train.micro_batch"] == CategoricalDistribution((4, 8, 16))
    # range's stop is exclusive, as everywhere in Hydra: 2, 4, 6, 8.
    assert space["model.n_head"] == IntDistribution(2, 8, step=2)
    assert space["schedule.name"] == CategoricalDistribution(("cosine", "wsd"))
    # Fixed values reach every trial as they were written.
    assert fixed == {"optim.beta2": "optim.beta2=0.99", "+extra.key": "+extra.key=3"}
    assert describe(space["optim.lr"]) == "tag(log, interval(0.0001, 0.01))"
    assert describe(space["model.n_head"]) == "range(2, 10, 2)"


def test_grid_takes_finite_spaces_only() -> None:
    space, _ = parse(["a=choice(1e-5, 3e-3)", "b=range(1, 4)", "c=range(0.0, 0.3, 0.1)"])
    grid = grid_values(space)
    assert grid["a"] == [1e-5, 3e-3] and grid["b"] == [1, 2, 3]
    assert grid["c"] == pytest.approx([0.0, 0.1, 0.2])
    space, _ = parse(["optim.lr=interval(1e-4, 1e-2)"])
    with pytest.raises(SweepError, match="optim.lr is continuous .*choice"):
        grid_values(space)


def test_bad_interval_is_one_line_naming_the_override() -> None:
    with pytest.raises(SweepError) as e:
        parse(["optim.lr=tag(log, interval(0.0, 1e-2))"])
    assert str(e.value).startswith("error: optim.lr=tag(log, interval(0.0, 1e-2)):")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [3e-3, 1e-05, 0.1 + 0.2, 7, True, False, None, "cosine",
                                   "two words", "it's", "a=b,c"])  # fmt: skip
def test_override_values_read_back_as_themselves(value: object) -> None:
    (override,) = OverridesParser.create().parse_overrides([f"k={override_value(value)}"])
    assert override.value() == value


def test_sweeper_refuses_unknown_parameter_keys_with_a_hint() -> None:
    sweeper = OptunaSweep("tpe", "median", "minimize", None, None, 4, 1, 0.0, None, None)
    sweeper._check_keys(["optim.lr", "model", "+hydra.x", "hydra.job.name"])  # all fine
    with pytest.raises(SweepError) as e:
        sweeper._check_keys(["optim.lrr"])
    assert "unknown config key 'optim.lrr'. Did you mean 'optim.lr'?" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_mixture_weight_is_a_parameter_a_sweep_can_search() -> None:
    sweeper = OptunaSweep("tpe", "median", "minimize", None, None, 4, 1, 0.0, None, None)
    sweeper._check_keys(["data.mix.code.weight", "data.mix.web.dir"])  # any source name
    with pytest.raises(SweepError, match=r"Did you mean 'data.mix.code.weight'\?"):
        sweeper._check_keys(["data.mix.code.wieght"])
    space, _ = parse(["data.mix.code.weight=interval(0.1, 0.5)"])
    assert space["data.mix.code.weight"] == FloatDistribution(0.1, 0.5)


def test_a_trial_dir_only_continues_as_the_same_trial(tmp_path: Path) -> None:
    run = tmp_path / "sweep" / "0"
    mine = ["experiment=debug", "optim.lr=0.001"]
    claim(run, mine, str(tmp_path / "sweep"))
    claim(run, list(reversed(mine)), str(tmp_path / "sweep"))  # the same trial, resumed
    with pytest.raises(ConfigError, match=r"holds a trial of another sweep .*optim\.lr=0\.003"):
        claim(run, ["experiment=debug", "optim.lr=0.003"], str(tmp_path / "sweep"))


def test_a_trial_dir_is_run_in_by_one_process_at_a_time(tmp_path: Path) -> None:
    """The lock is the kernel's (a POSIX lock): a second holder is refused with the first one
    named, in this process too, and a lock whose holder is gone (released, or the process
    killed) is free again."""
    first, second = DirLock(tmp_path / ".trial.lock"), DirLock(tmp_path / ".trial.lock")
    assert first.acquire() is None
    assert second.acquire().startswith(f"pid {os.getpid()} on {os.uname().nodename}, started ")
    first.release()
    assert second.acquire() is None
    second.release()


def test_srun_tasks_become_ranks() -> None:
    step = {
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "40123",
    }  # fmt: skip
    env = dict(step)
    assert adopt_slurm_tasks(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "3", "4", "1", "2",
    )  # fmt: skip
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", str(20000 + 40123 % 40000))
    under_torchrun = dict(step, RANK="0", WORLD_SIZE="8")
    assert not adopt_slurm_tasks(under_torchrun) and under_torchrun["WORLD_SIZE"] == "8"
    # A batch script is one process, whatever SLURM_NTASKS says.
    batch = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}
    assert not adopt_slurm_tasks(batch) and "RANK" not in batch


def test_results_csv_has_a_row_per_trial(tmp_path: Path) -> None:
    for num, (lr, value, state) in enumerate([(1e-3, 5.5, "complete"), (1e-5, 6.2, "pruned")]):
        run = tmp_path / str(num)
        claim(run, ["experiment=debug", f"optim.lr={lr}", "train.max_steps=20"], str(tmp_path))
        write_result(
            run,
            TrialResult(state, "val_loss", value, 20 if num == 0 else 5, 5120, 100.0, 112.5),
        )
    (tmp_path / "2").mkdir()
    claim(tmp_path / "2", ["experiment=debug", "optim.lr=0.01"], str(tmp_path))  # died
    rows = results.rows_from_run_dirs(tmp_path, ["optim.lr"])
    results.write_csv(tmp_path, rows, "val_loss")
    with open(tmp_path / results.CSV) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [
        "trial", "state", "optim.lr", "val_loss", "steps", "tokens", "wall_s", "run_dir",
    ]  # fmt: skip
    assert [(r["trial"], r["state"], r["optim.lr"], r["val_loss"], r["steps"]) for r in table] == [
        ("0", "complete", "0.001", "5.5", "20"),
        ("1", "pruned", "1e-05", "6.2", "5"),
        ("2", "failed", "0.01", "", ""),
    ]
    assert table[0]["wall_s"] == "12.5" and table[0]["run_dir"] == str(tmp_path / "0")
    study = results.study_of(rows)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL"]
    # A parameter spanning two decades gets a log axis in the plots.
    assert study.trials[0].distributions["optim.lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert json.loads((tmp_path / "0" / "result.json").read_text())["value"] == 5.5


def test_failpoint_fires_on_its_nth_hit() -> None:
    code = "from pretrain.failpoint import failpoint\nfor i in range(5):\n    print(i, flush=True)\n    failpoint('x')\n"  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=test_env(PRETRAIN_FAILPOINT="x@3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["0", "1", "2"]
