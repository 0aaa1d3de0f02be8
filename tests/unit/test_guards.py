"""The divergence guard with a real single-process engine: a NaN or an exploded loss (far above
a uniform guess's) stops the run at the next check, naming the last good checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pretrain.engine import create_engine
from pretrain.training.guards import DivergenceGuard, NonFiniteLoss
from tests.conftest import REPO


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
    guard.check(3, None)
    guard.observe(torch.tensor(bad), norm)
    guard.observe(torch.tensor(5.0), norm)  # a good step after it does not hide it
    with pytest.raises(NonFiniteLoss, match="between step 3 and step 5.*last good checkpoint is "
                       "ckpt/step_3"):  # fmt: skip
        guard.check(5, Path("ckpt/step_3"))
