"""In-loop validation (`Validator`): the same batches at every validation, its loader built once
and only when first needed, the shards of a pass released after it, the value logged before
anything is decided on it, and the value itself: the mean of the batches' mean losses, computed
here independently with the plain model."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from pretrain.data.loader import TokenLoader
from pretrain.data.mixture import Source
from pretrain.data.shards import read_manifest
from pretrain.early_stopping import EarlyStopping
from pretrain.engine import create_engine
from pretrain.engine.process_group import reset_accelerate_state
from pretrain.model import GPT, GPTConfig
from pretrain.optim import build_optimizer
from pretrain.training.setup import RunData
from pretrain.training.validate import Validator
from tests.conftest import REPO


@pytest.fixture
def run(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    overrides = [
        "experiment=debug",
        "model.vocab_size=512",
        "train.eval_batches=3",
        "train.eval_every=5",
        "train.early_stop_patience=1",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    engine = create_engine(cfg, accum=1)
    torch.manual_seed(0)
    engine.setup(
        GPT(GPTConfig(**cfg.model)), lambda m: build_optimizer(m, cfg.optim, engine.device)
    )
    early = EarlyStopping.from_config(cfg.train)
    data = RunData([Source("", read_manifest(tiny_data), 1.0)])
    validator = Validator.from_config(cfg, data, engine, early, tmp_path)
    yield cfg, engine, validator
    reset_accelerate_state()


def test_same_batches_each_time_and_the_loader_built_once_when_needed(
    run: Any, tiny_data: Path
) -> None:
    cfg, engine, validator = run
    assert validator.loaders is None  # nothing read before the first validation
    assert [s for s in range(1, 21) if validator.due(s)] == [5, 10, 15, 20]

    logged: list[tuple[int, dict[str, Any]]] = []
    first = validator.run(5, lambda step, values: logged.append((step, dict(values))))
    loaders = validator.loaders
    second = validator.run(10, lambda step, values: logged.append((step, dict(values))))
    assert validator.loaders is loaders  # built once
    assert first.values == second.values  # the same weights, the same batches: the same value
    assert [step for step, _ in logged] == [5, 10]

    # The value, computed independently: the plain model on the first 3 val batches.
    model = engine.unwrapped()
    batches = TokenLoader(tiny_data, "val", cfg.train.seq_len, cfg.train.micro_batch,
                          seed=cfg.data.seed, loop=False, partitions=None)  # fmt: skip
    losses = []
    with torch.no_grad():
        for x, y in batches:
            losses.append(float(model(x, y)[1]))
            if len(losses) == 3:
                break
    assert first.values["val_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert first.values["val_ppl"] == pytest.approx(math.exp(first.values["val_loss"]))

    # Early stopping decided on it: a new best, then (patience 1) no improvement: stop.
    assert first.new_best and not second.new_best
    assert validator.stopped_early and "train.early_stop_patience=1" in validator.why_stopped


def test_a_pass_cut_short_keeps_no_shard_loaded(tiny_data: Path) -> None:
    loader = TokenLoader(tiny_data, "val", 64, 2, loop=False, partitions=None)
    with contextlib.closing(iter(loader)) as batches:
        next(batches)
        assert loader._reader.held  # the shards its first batch came from
    assert not loader._reader.held
