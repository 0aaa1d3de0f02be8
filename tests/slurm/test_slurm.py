"""launch/slurm/train.sbatch on a real two-node Slurm cluster (two slurmds on this host).

The project's own batch script runs `pretrain.train experiment=debug` on the CPU, one process per
node (world size 2): a plain run, a preemption (USR1 to the batch shell, as `--signal=B:USR1`
delivers it) that saves, requeues and resumes to the same final weights, and a rank killed with
SIGKILL, which must fail the job quickly instead of leaving it hanging. And a sweep whose trials
are Slurm jobs (hydra/launcher=submitit_slurm).

One module, so that under pytest-xdist (`--dist loadscope`) one worker runs the whole tier on
the one cluster of the session.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from pretrain.sweep.study import storage
from tests.conftest import REPO, test_env
from tests.data_fixtures import tiny_data  # noqa: F401
from tests.slurm_cluster import SlurmCluster
from tests.wandb_offline import find_offline_runs, read_history

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
STEPS = 60  # a signal sent after step 2 is handled within a few steps: ample margin
# Only the final checkpoint, plus the one a preemption writes: what is resumed is what was saved
# because of the signal, not a periodic checkpoint. A DataLoader worker per rank: Slurm signals
# every process of a step, workers included, and they must survive it.
COMMON = (
    # strategy=auto (the default): several processes under Slurm's torchrun mean ddp.
    "data.num_workers=1",
    f"train.max_steps={STEPS}",
    "checkpoint.every=100000",
    "checkpoint.keep_last=5",
    "logging.every=1",
)


class Job:
    """One submission of train.sbatch from `submit_dir` (which gets logs/ and runs/)."""

    def __init__(
        self, slurm: SlurmCluster, submit_dir: Path, data: Path, *overrides: str, nodes: int = 2
    ) -> None:
        self.slurm = slurm
        self.rec: dict[str, str] = {}  # the last scontrol record seen by wait()
        (submit_dir / "logs").mkdir(parents=True, exist_ok=True)
        args = ["-N", str(nodes), str(SBATCH), "experiment=debug", f"data.dir={data}", *overrides]
        self.id = slurm.sbatch(args, cwd=submit_dir, env=test_env())
        self.run_dir = submit_dir / "runs" / f"slurm-{self.id}"
        self.log = submit_dir / "logs" / f"pretrain-{self.id}.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"

    def wait(self, timeout: float, until=None) -> dict[str, str]:
        try:
            self.rec = self.slurm.wait_job(self.id, until=until, timeout=timeout)
            return self.rec
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- job log\n{self.log_text()[-6000:]}") from None

    def steps_logged(self) -> list[int]:
        if not (self.run_dir / "metrics.jsonl").exists():
            return []
        return [r["step"] for r in read_metrics(self.run_dir) if "loss" in r]

    def wait_for_step(self, step: int, timeout: float) -> None:
        """Until the run has logged `step`; fails if the job ends first."""
        deadline = time.monotonic() + timeout
        while not any(s >= step for s in self.steps_logged()):
            state = self.slurm.job(self.id)["JobState"]
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
                f"job {self.id} is {state} before reaching step {step}:\n{self.log_text()[-6000:]}"
            )
            assert time.monotonic() < deadline, (
                f"job {self.id} did not reach step {step} in {timeout}s:\n{self.log_text()[-6000:]}"
            )
            time.sleep(0.2)

    def explain(self, rec: dict[str, str]) -> str:
        return (
            f"job {self.id}: {rec.get('JobState')} exit {rec.get('ExitCode')} "
            f"restarts {rec.get('Restarts')}\n--- job log\n{self.log_text()[-8000:]}"
        )


def train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


@pytest.fixture(scope="module")
def straight_job(
    slurm: SlurmCluster,
    tiny_data: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Job:
    """An uninterrupted 2-node run: the reference for the preempted one."""
    job = Job(slurm, tmp_path_factory.mktemp("straight"), tiny_data, *COMMON)
    job.wait(timeout=150)
    return job


@pytest.mark.timeout(200)
def test_two_node_job_completes(straight_job: Job) -> None:
    job, rec = straight_job, straight_job.rec
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", job.explain(rec)
    log = job.log_text()
    # One launcher per node, node ranks from SLURM_NODEID, rendezvous on the first node.
    assert re.search(r"node\.sh: node 0/2 .*\(n1\).*rendezvous n1:", log), log[-4000:]
    assert re.search(r"node\.sh: node 1/2 .*\(n2\).*rendezvous n1:", log), log[-4000:]
    assert "strategy ddp x2 (auto: 2 processes (torchrun or Slurm))" in log, log[-4000:]
    # Everything lands in the run directory keyed by the job id.
    assert job.steps_logged() == list(range(1, STEPS + 1))
    final = checkpoint.find_resume(job.run_dir / "checkpoints", "auto")
    assert final is not None and final.name == checkpoint.step_dir_name(STEPS)
    state = train_state(final)
    assert state["world_size"] == 2, state
    assert state["step"] == STEPS


@pytest.mark.timeout(240)
def test_preempted_job_requeues_and_resumes_exactly(
    slurm: SlurmCluster,
    straight_job: Job,
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    job = Job(slurm, tmp_path, tiny_data, *COMMON, "logging.wandb=true")
    job.wait_for_step(2, timeout=120)
    # What `#SBATCH --signal=B:USR1@180` does ahead of the time limit: USR1 to the batch shell
    # only. Passing it on to the trainers and requeueing is the script's job.
    proc = subprocess.run(
        ["scancel", "--batch", "--signal=USR1", str(job.id)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    rec = job.wait(timeout=180)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", job.explain(rec)
    assert rec["Restarts"] == "1", job.explain(rec)

    log = job.log_text()
    m = re.search(r"preempted \(signal 10\) at step (\d+)", log)
    assert m, f"no trainer reported the preemption:\n{log[-6000:]}"
    stopped_at = int(m.group(1))
    assert 2 <= stopped_at < STEPS
    # The checkpoint the signal caused, and the resume from exactly that one.
    ckpts = {
        train_state(p)["step"] for p in checkpoint.list_checkpoints(job.run_dir / "checkpoints")
    }
    assert ckpts == {stopped_at, STEPS}, (ckpts, log[-6000:])
    assert re.search(rf"resumed from \S+ \(step {stopped_at}\)", log), log[-6000:]
    assert "requeueing job" in log
    # Both starts appended to the one log file, and no step was done twice or skipped.
    assert log.count(f"job {job.id} start") == 2, log[-6000:]
    assert job.steps_logged() == list(range(1, STEPS + 1))

    # One W&B run continued: two offline run directories (one per start) with the same id,
    # the second one's history starting after the preemption step.
    runs = find_offline_runs(job.run_dir / "wandb")
    ids = {r.stem.removeprefix("run-") for r in runs}
    assert len(runs) == 2 and len(ids) == 1, runs
    first, second = (sorted(h["_step"] for h in read_history(r) if "loss" in h) for r in runs)
    assert first[-1] == stopped_at and second[0] == stopped_at + 1, (first, second)

    # Same final weights as the uninterrupted job, bit for bit (CPU, fp32).
    ours = checkpoint.load_model_weights(
        job.run_dir / "checkpoints" / checkpoint.step_dir_name(STEPS)
    )
    ref = checkpoint.load_model_weights(
        straight_job.run_dir / "checkpoints" / checkpoint.step_dir_name(STEPS)
    )
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), f"{k} differs after preemption + resume"


@pytest.mark.timeout(200)
def test_killed_rank_fails_the_job_fast(
    slurm: SlurmCluster,
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    timeout_s = 30
    job = Job(
        slurm,
        tmp_path,
        tiny_data,
        "strategy=ddp",
        "train.max_steps=1000000",
        "checkpoint.every=1000000",
        "logging.every=1",
        f"dist.timeout_s={timeout_s}",
    )
    job.wait_for_step(1, timeout=120)
    trainers = [
        p
        for p in slurm.job_processes(job.id)
        if "pretrain.train" in p.argv and p.env.get("RANK") == "1"
    ]
    assert len(trainers) == 1, [(p.pid, p.argv[:6], p.env.get("RANK")) for p in trainers]
    assert trainers[0].env.get("SLURM_NODEID") == "1"  # the rank on the second node
    os.kill(trainers[0].pid, signal.SIGKILL)
    killed = time.monotonic()

    rec = job.wait(timeout=timeout_s + 60)
    took = time.monotonic() - killed
    assert rec["JobState"] == "FAILED", job.explain(rec)
    assert took < timeout_s + 30, f"the job took {took:.0f}s to fail\n{job.explain(rec)}"
    assert "requeueing" not in job.log_text()
    # Nothing of the job is left running on any node.
    deadline = time.monotonic() + 30
    while slurm.job_processes(job.id) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = slurm.job_processes(job.id)
    assert not left, [(p.pid, p.argv[:4]) for p in left]


# ---- a sweep on the cluster ----------------------------------------------------------------
# Trials as Slurm jobs (hydra/launcher=submitit_slurm) on the same two-node cluster.
#
# One Optuna sweep, in this process's child, of 4 trials, 2 at a time, each trial a 2-node job
# (one rank per node, ranks from srun's tasks): the jobs of a batch run at the same time, every
# trial trains at world size 2 with the parameters the sweeper chose, and the sweep writes its
# results. The cluster has no accounting database, so submitit's status polls (sacct) fail and
# it learns that a job is done from its result file, as it is designed to.

SWEEP_STEPS = 20


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
        "optim.lr=tag(log,interval(1e-4,1e-2))", f"train.max_steps={SWEEP_STEPS}",
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
        final = run / "checkpoints" / f"step_{SWEEP_STEPS:07d}" / "train_state.json"
        assert json.loads(final.read_text())["world_size"] == 2
        assert (
            yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == t.params["optim.lr"]
        )
        result = json.loads((run / "result.json").read_text())
        assert result["value"] == t.value and result["tokens"] == SWEEP_STEPS * 2 * 4 * 64
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
