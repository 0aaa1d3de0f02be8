"""Ctrl-C under torchrun: a real 2-rank job interrupted once saves and stops, and resumes.

Two ways the SIGINT comes: a terminal's Ctrl-C reaches every process of the job (torchrun, the
ranks, their DataLoader workers), and torchrun passes its own on to the ranks, so each rank
gets it twice within milliseconds, which must not count as a second Ctrl-C; or only torchrun
gets it (`kill -INT <torchrun>`) and passes it on. Either way every rank finishes its step, the
job saves one verified checkpoint and no rank prints a traceback. torchrun itself reports the
signal its own way (a SignalException of its own, exit status 1): that is not the trainer's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from tests.conftest import REPO, test_env, torchrun

COMMON = ("experiment=debug", "strategy=ddp", "data.num_workers=1", "checkpoint.every=100000")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("to", ["job", "torchrun"])
def test_one_ctrl_c_saves_on_every_rank_and_the_run_resumes(
    tiny_data: Path, tmp_path: Path, to: str
) -> None:
    run, logs = tmp_path / "run", tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           f"--log-dir={logs}", "--redirects=3", "-m", "pretrain.train", *COMMON,
           f"data.dir={tiny_data}", f"run.dir={run}", "train.max_steps=100000"]  # fmt: skip
    job = subprocess.Popen(
        cmd, cwd=REPO, env=test_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 200
    while not ((run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-4000:]
        time.sleep(0.1)
    if to == "job":
        os.killpg(job.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    else:
        os.kill(job.pid, signal.SIGINT)
    _, err = job.communicate(timeout=120)

    ranks = ["".join(p.read_text() for p in sorted(logs.glob(f"*/attempt_0/{r}/std*.log")))
             for r in range(2)]  # fmt: skip
    for out in ranks:
        assert "Traceback" not in out and "interrupted twice" not in out, out[-4000:]
        assert out.count("interrupted: saving at the next logging step") == 1, out[-4000:]
    saved = checkpoint.find_resume(run / "checkpoints", "auto")
    assert saved is not None, err[-4000:]
    step = json.loads((saved / "train_state.json").read_text())["step"]
    assert f"interrupted (Ctrl-C) at step {step}: saved, exiting" in ranks[0]
    assert max(r["step"] for r in read_metrics(run)) == step
    assert "Received 2 death signal, shutting down workers" in err  # torchrun's own report

    more = torchrun(2, ["-m", "pretrain.train", *COMMON, f"data.dir={tiny_data}",
                        f"run.dir={run}", f"train.max_steps={step + 2}"])  # fmt: skip
    assert f"resumed from {saved} (step {step})" in more.stdout
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, step + 3))
