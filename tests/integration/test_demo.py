"""The README's first command, end to end on a small corpus: train, sample, plot."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.metrics import read_metrics
from tests.conftest import test_env

# Measured on this 2-core CPU with the test corpus (vocab 512): the demo experiment's logged
# loss went from about 6.03 nats (mean of steps 1-10) to 4.27 at step 50 (3.89 at step 80), a
# drop of 1.76. A model that does not learn stays near ln(512) = 6.24.
STEPS = 50
MIN_DROP_NATS = 1.5


@pytest.mark.timeout(400)
def test_demo_trains_samples_and_plots(tiny_data: Path, tmp_path: Path) -> None:
    # `python -m pretrain.demo` prepares data/demo unless it exists: give it the test corpus.
    shutil.copytree(tiny_data, tmp_path / "data" / "demo")
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.demo", f"train.max_steps={STEPS}", "logging.every=10",
         "checkpoint.every=1000", "train.eval_every=0", "logging.wandb=false"],
        cwd=tmp_path, env=test_env(), capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "demo"
    rows = [r for r in read_metrics(run) if "loss" in r]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert rows[-1]["step"] == STEPS
    assert first - last >= MIN_DROP_NATS, (first, last)
    assert "----- sample 0 -----" in proc.stdout
    png = run / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
