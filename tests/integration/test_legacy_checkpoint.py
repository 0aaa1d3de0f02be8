"""A checkpoint written by an earlier version of the trainer still resumes, and continues the
same run: the same data order, optimizer state, RNG streams, W&B run id and early-stopping
record.

`tests/fixtures/legacy_run/` was written once by that version and is kept as it was:
- `data/`: a prepared data dir (24 stdlib files, a 400-piece tokenizer);
- `run/`: a run stopped with `train.stop_at_step=4` of 8 (a 1-layer, 32-wide GPT with dropout
  0.1, lr 1e-2: the command is `FIXTURE_ARGS` below), holding `checkpoints/step_0000004`;
- `continued_metrics.jsonl`: steps 5-8 and the validation at step 8 as that version logged
  them when it resumed the run.

The losses are compared with a tolerance, not bitwise: the first 4 steps ran on another CPU,
whose fp32 kernels round differently in the last bits. A resume that lost any part of the
state is off by more than the tolerance (checked by hand: without its RNG states, dropout moves
step 5's loss by 3e-3; four windows further on in the data, by 2e-2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.metrics import read_metrics
from tests.conftest import REPO, test_env

FIXTURE = REPO / "tests" / "fixtures" / "legacy_run"
FIXTURE_ARGS = (
    "experiment=debug",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=64",
    "model.dropout=0.1",
    "train.seq_len=32",
    "train.micro_batch=4",
    "train.max_steps=8",
    "checkpoint.every=4",
    "train.eval_every=4",
    "train.early_stop_patience=5",
    "data.partitions=64",
    "strategy=single",
    "optim.lr=1e-2",
    "schedule.warmup_steps=2",
)


@pytest.mark.timeout(300)
def test_checkpoint_of_an_earlier_version_resumes(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(FIXTURE / "data", data)
    shutil.copytree(FIXTURE / "run", run)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            *FIXTURE_ARGS,
            f"data.dir={data}",
            f"run.dir={run}",
        ],
        cwd=REPO,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "resumed from" in proc.stdout and "(step 4)" in proc.stdout

    records = [json.loads(line) for line in (FIXTURE / "continued_metrics.jsonl").open()]
    expected = [r for r in records if "loss" in r]
    got = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert sorted(got) == list(range(1, 9))  # steps 1-4 from the fixture, 5-8 from this run
    for want in expected:
        have = got[want["step"]]
        assert have["tokens_seen"] == want["tokens_seen"]
        assert have["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert have["loss"] == pytest.approx(want["loss"], abs=2e-4), want["step"]
    # The validation at the end, as that version computed it (the same val batches and mean).
    (want_val,) = [r for r in records if "val_loss" in r]
    (have_val,) = [r for r in read_metrics(run) if "val_loss" in r and r["step"] == 8]
    assert have_val["val_loss"] == pytest.approx(want_val["val_loss"], abs=2e-4)

    # The same run continues: its W&B id and early-stopping record came from the checkpoint.
    saved = json.loads((run / "checkpoints" / "step_0000008" / "train_state.json").read_text())
    old = json.loads(
        (FIXTURE / "run" / "checkpoints" / "step_0000004" / "train_state.json").read_text()
    )
    assert saved["wandb_run_id"] == old["wandb_run_id"]
    assert saved["early_stopping"]["best_step"] == 8
    assert saved["tokens_seen"] == 1024
    assert (run / "checkpoints" / "best").read_text().strip() == "step_0000008"
