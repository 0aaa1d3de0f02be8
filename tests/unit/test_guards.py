"""The divergence guard with a real single-process engine: a NaN or an exploded loss (far above
a uniform guess's) stops the run at the next check, naming the last good checkpoint. Ctrl-C
counted by real signals: torchrun's copy of the first is not a second one."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pretrain.engine import create_engine
from pretrain.training.guards import DivergenceGuard, NonFiniteLoss
from tests.conftest import REPO, test_env


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - an Engine
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=debug"])
    return create_engine(cfg, accum=1)


@pytest.mark.parametrize("bad", [float("nan"), 4.5 * math.log(512)])
def test_a_nan_or_exploded_loss_stops_at_the_next_check(engine, bad: float) -> None:
    guard = DivergenceGuard(engine, vocab_size=512)
    norm = torch.tensor(1.0)
    for loss in (6.3, 9.0, 3.0):  # a healthy run: from ln(512) = 6.24 down, a bump
        guard.observe(torch.tensor(loss), norm)
    guard.check(3, lambda: None)
    guard.observe(torch.tensor(bad), norm)
    guard.observe(torch.tensor(5.0), norm)  # a good step after it does not hide it
    with pytest.raises(NonFiniteLoss, match="between step 3 and step 5.*last good checkpoint is "
                       "ckpt/step_3"):  # fmt: skip
        guard.check(5, lambda: Path("ckpt/step_3"))


# SIGINTs to this very process, `gap` seconds apart, the Python handler running in between; what
# the process saw after each: "flag" (saving requested) or "stop" (KeyboardInterrupt).
SIGINTS = """
import os, signal, sys, time
from pretrain.training.guards import Preemption
p = Preemption()
for gap in map(float, sys.argv[1:]):
    time.sleep(gap)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here
        print("flag" if p.signum == signal.SIGINT else "none", flush=True)
    except KeyboardInterrupt:
        print("stop", flush=True)
        break
"""


@pytest.mark.parametrize(
    ("torchrun", "gaps", "seen"),
    [
        (False, "0 0.05", "flag stop"),  # a second Ctrl-C stops at once
        (True, "0 0.05 0.05", "flag flag stop"),  # torchrun's copy, then a real second one
        (True, "0 1.5", "flag stop"),  # too late for a copy: a second Ctrl-C
    ],
)
def test_a_second_ctrl_c_stops_at_once_but_torchruns_copy_of_the_first_does_not(
    torchrun: bool, gaps: str, seen: str
) -> None:
    env = test_env(TORCHELASTIC_RUN_ID="job") if torchrun else test_env()
    if not torchrun:
        env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.run(
        [sys.executable, "-c", SIGINTS, *gaps.split()],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.stdout.split() == seen.split(), proc.stderr[-2000:]
