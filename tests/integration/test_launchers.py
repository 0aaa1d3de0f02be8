"""launch/local.sh as launch/README.md tells users to run it, on the CPU (one process, with
--auto-resume after a preemption). The accelerate configs: tests/integration/test_accelerate.py;
the Slurm script has its own tier: tests/slurm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from tests.conftest import REPO, test_env
from tests.data_fixtures import tiny_data  # noqa: F401

LOCAL_SH = REPO / "launch" / "local.sh"


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "pretrain.train",
        "experiment=debug",
        f"data.dir={data}",
        f"run.dir={run_dir}",
        "logging.wandb=false",
        *extra,
    ]


def finished(proc: subprocess.CompletedProcess[str] | subprocess.Popen[bytes], out: str) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-8000:]}"


def final_state(run_dir: Path) -> dict:
    ckpt = checkpoint.find_resume(run_dir / "checkpoints", "auto")
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return json.loads((ckpt / "train_state.json").read_text())


@pytest.mark.timeout(240)
def test_local_sh_cpu_auto_resume(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """launch/local.sh on the CPU: one process; SIGUSR1 to the script makes the trainer save and
    exit 75, --auto-resume starts it again from that checkpoint, and the run completes."""
    run_dir = tmp_path / "run"
    steps = 60
    args = train_args(tiny_data, run_dir, f"train.max_steps={steps}", "logging.every=1")[2:]
    cmd = [
        str(LOCAL_SH),
        "--auto-resume",
        *args,
        "checkpoint.every=100000",
        "checkpoint.resume=none",
    ]
    # No GPU visible, whatever the machine: the CPU path is the one under test.
    env = test_env(CUDA_VISIBLE_DEVICES="")
    out_file = tmp_path / "local.log"
    with open(out_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 150
            while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
                assert proc.poll() is None, out_file.read_text()[-6000:]
                assert time.monotonic() < deadline, out_file.read_text()[-6000:]
                time.sleep(0.1)
            os.kill(proc.pid, signal.SIGUSR1)
            proc.wait(timeout=200)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = out_file.read_text()
    finished(proc, text)
    assert "local.sh: 1 process(es) on CPU" in text
    assert "training was preempted (exit 75)" in text, text[-6000:]
    saved = [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")]
    assert len(saved) == 2 and saved[-1] == checkpoint.step_dir_name(steps), saved
    stopped_at = int(saved[0].split("_")[1])
    assert 1 <= stopped_at < steps
    # The second start continued from the checkpoint despite checkpoint.resume=none at first.
    assert f"(step {stopped_at})" in text and "resumed from" in text, text[-6000:]
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, steps + 1))
    assert final_state(run_dir)["world_size"] == 1
