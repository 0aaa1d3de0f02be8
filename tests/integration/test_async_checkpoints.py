"""Checkpoints written in the background (`checkpoint.async_save=true`), through the CLI with
real kills, signals and failures: nothing a synchronous save guarantees is weakened.

(Same files as a synchronous save under every strategy: tests/distributed/test_strategies.py;
a background write failing on one of two ranks: tests/distributed/test_fail_fast.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from tests.conftest import REPO, test_env
from tests.integration.test_train import losses, ok, train_cli

ASYNC = "checkpoint.async_save=true"
SLOW = test_env(PRETRAIN_FAILPOINT="checkpoint.write:sleep")  # every write takes 2 s more


def names(run: Path) -> list[str]:
    return [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")]


@pytest.mark.timeout(200)
def test_background_saves_resume_exactly(tiny_data: Path, tmp_path: Path) -> None:
    """A run saved in the background, stopped and resumed, is the uninterrupted run: every
    loss bit-identical (the staged copy is the state of its step, not of a later one)."""
    common = ("train.max_steps=8", "model.dropout=0.1", "checkpoint.every=2", ASYNC)
    ok(train_cli(tiny_data, tmp_path / "straight", *common))
    ok(train_cli(tiny_data, tmp_path / "split", *common, "train.stop_at_step=5"))
    out = ok(train_cli(tiny_data, tmp_path / "split", *common))
    assert "resumed from" in out.stdout and "step_0000005" in out.stdout
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert names(tmp_path / "straight") == ["step_0000006", "step_0000008"]  # keep_last=2


@pytest.mark.timeout(200)
def test_one_save_at_a_time_and_the_end_waits(tiny_data: Path, tmp_path: Path) -> None:
    """Writes slower than the steps: each save waits for the one before it, the run's end
    waits for the last one, and every checkpoint is complete and verified."""
    run = tmp_path / "run"
    out = ok(train_cli(tiny_data, run, "train.max_steps=3", "checkpoint.every=1", ASYNC,
                       "checkpoint.keep_last=5", env=SLOW)).stdout  # fmt: skip
    lines = [line for line in out.splitlines() if "checkpoint" in line]
    events = [("saved" if line.startswith("saved") else "staged", line.split("step_")[1][:7])
              for line in lines]  # fmt: skip
    assert events == [
        ("staged", "0000001"), ("saved", "0000001"), ("staged", "0000002"),
        ("saved", "0000002"), ("staged", "0000003"), ("saved", "0000003"),
    ], lines  # fmt: skip
    assert names(run) == ["step_0000001", "step_0000002", "step_0000003"]
    assert all(
        checkpoint.verify(p) is None for p in checkpoint.list_checkpoints(run / "checkpoints")
    )
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"


@pytest.mark.timeout(200)
def test_sigkill_during_a_background_write_keeps_the_previous_checkpoint(
    tiny_data: Path, tmp_path: Path
) -> None:
    """Killed while the second checkpoint's tensors are being written by the background
    thread: it never appears, and the next start resumes from the first."""
    run = tmp_path / "run"
    kill = test_env(PRETRAIN_FAILPOINT="checkpoint.write@2")
    proc = train_cli(tiny_data, run, "train.max_steps=6", "checkpoint.every=2", ASYNC, env=kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert names(run) == ["step_0000002"]
    assert list((run / "checkpoints").glob(".tmp-step_0000004"))  # the half-written one
    out = ok(train_cli(tiny_data, run, "train.max_steps=6", "checkpoint.every=2", ASYNC))
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'}" in out.stdout
    assert names(run) == ["step_0000004", "step_0000006"]  # keep_last=2
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_waits_for_the_write(tiny_data: Path, tmp_path: Path, sig: int) -> None:
    """SIGTERM (or Ctrl-C) while a background write is in flight: the run saves its stop step
    after that write, waits for its own, and exits 75 (130) with both complete."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.train", "experiment=debug", f"data.dir={tiny_data}",
           f"run.dir={run}", "train.max_steps=100000", "checkpoint.every=3", ASYNC]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=SLOW, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / ".tmp-step_0000003").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else 75), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    saved = checkpoint.list_checkpoints(run / "checkpoints")
    assert saved[0].name == "step_0000003" and len(saved) == 2, (saved, out)
    last = max(r["step"] for r in read_metrics(run) if "loss" in r)
    assert saved[-1].name == checkpoint.step_dir_name(last)
    assert (run / "checkpoints" / "latest").read_text().strip() == saved[-1].name
    assert out.index(f"saved checkpoint {saved[-1]}") < out.index(
        "interrupted" if sig == signal.SIGINT else "preempted"
    )


@pytest.mark.timeout(200)
def test_an_error_while_a_write_is_in_flight(tiny_data: Path, tmp_path: Path) -> None:
    """The loss turns NaN while a slow background write is in flight: one message, exit 1, no
    hang; whatever became complete holds finite weights, and nothing half-written is taken."""
    run = tmp_path / "run"
    ok(train_cli(tiny_data, run, "train.max_steps=2", "checkpoint.every=2"))
    proc = train_cli(
        tiny_data, run, "train.max_steps=40", "checkpoint.every=1", "optim.lr=1e6",
        "optim.grad_clip=0", "schedule.name=constant", "schedule.warmup_steps=0", ASYNC,
        env=SLOW,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "NaN/inf" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # The write in flight was let finish before the message named the last good checkpoint.
    named = proc.stderr.split("the last good checkpoint is ")[1].split(". ")[0]
    assert checkpoint.is_complete(Path(named)), named
    assert Path(named) == checkpoint.find_resume(run / "checkpoints", "auto")
    for ckpt in checkpoint.list_checkpoints(run / "checkpoints"):
        assert checkpoint.verify(ckpt) is None
        weights = checkpoint.load_model_weights(ckpt)
        assert all(torch.isfinite(w).all() for w in weights.values()), ckpt
    out = ok(train_cli(tiny_data, run, "train.max_steps=3", "checkpoint.every=1"))
    assert "resumed from" in out.stdout
