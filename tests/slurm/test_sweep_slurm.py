"""A sweep on the real two-node Slurm cluster: trials as Slurm jobs via hydra/launcher=submitit_slurm.

One Optuna sweep, in this process's child, of 4 trials, 2 at a time, each trial a 2-node job
(one rank per node, ranks from srun's tasks): the jobs of a batch run at the same time, every
trial trains at world size 2 with the parameters the sweeper chose, and the sweep writes its
results. The cluster has no accounting database, so submitit's status polls (sacct) fail and
it learns that a job is done from its result file, as it is designed to.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from pretrain.sweep.study import storage
from tests.conftest import REPO, test_env
from tests.data_fixtures import tiny_data  # noqa: F401
from tests.slurm_cluster import SlurmCluster

# One worker runs the Slurm tier under pytest-xdist: its modules share one session cluster.
pytestmark = pytest.mark.xdist_group("slurm")

STEPS = 20


@pytest.mark.timeout(600)
def test_sweep_runs_trials_as_concurrent_two_node_jobs(
    slurm: SlurmCluster,
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "pretrain.train", "-m", "experiment=debug", f"data.dir={tiny_data}",
        f"hydra.sweep.dir={sweep}", "hydra/sweeper=optuna", "hydra/launcher=submitit_slurm",
        "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
        "hydra.sweeper.sampler=random", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
        "optim.lr=tag(log,interval(1e-4,1e-2))", f"train.max_steps={STEPS}",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"

    study = optuna.load_study(study_name="sweep", storage=storage(str(sweep / "study.journal")))
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    spans = []
    for t in study.trials:
        run = sweep / str(t.number)
        assert t.state == optuna.trial.TrialState.COMPLETE, (t.number, t.state)
        final = run / "checkpoints" / f"step_{STEPS:07d}" / "train_state.json"
        assert json.loads(final.read_text())["world_size"] == 2
        assert (
            yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == t.params["optim.lr"]
        )
        result = json.loads((run / "result.json").read_text())
        assert result["value"] == t.value and result["tokens"] == STEPS * 2 * 4 * 64
        spans.append((result["started"], result["ended"]))
    # Each batch's two jobs ran at the same time: each started before the other ended.
    for a, b in (spans[0], spans[1]), (spans[2], spans[3]):
        assert max(a[0], b[0]) < min(a[1], b[1]), spans

    # Two job arrays of two 2-node jobs each (submitit's folder is named by the job ids).
    jobs = sorted(
        p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)
    )
    assert len(jobs) == 4, jobs
    for job in jobs:
        rec = slurm.job(job)  # type: ignore[arg-type]  # scontrol takes <array>_<task>
        assert rec["JobState"] == "COMPLETED" and rec["NumNodes"] == "2", rec

    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["complete"] * 4
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == study.best_value
