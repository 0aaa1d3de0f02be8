"""Early stopping: the decision (`EarlyStopping`) and the `best` checkpoint (`Checkpointer`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from pretrain import checkpoint
from pretrain.checkpoint import Checkpointer, CheckpointError
from pretrain.config import CheckpointConfig, to_dict
from pretrain.data.loader import TokenLoader
from pretrain.early_stopping import EarlyStopping
from pretrain.engine import create_engine
from pretrain.engine.process_group import reset_accelerate_state
from pretrain.model import GPT, GPTConfig
from pretrain.optim import build_optimizer
from pretrain.training.state import TrainState
from tests.conftest import REPO

# ---- the decision ------------------------------------------------------------------------------


def test_stops_after_patience_evaluations_without_a_new_best() -> None:
    es = EarlyStopping(patience=2, min_delta=0.0)
    assert [es.observe(s, v) for s, v in [(10, 3.0), (20, 2.5), (30, 2.6)]] == [True, True, False]
    assert not es.should_stop and (es.best, es.best_step, es.bad_evals) == (2.5, 20, 1)
    assert es.observe(40, 2.4)  # a new best resets the count
    assert not es.observe(50, 2.4) and not es.observe(60, 2.45)
    assert es.should_stop
    assert "for 2 evaluations" in es.reason and "best 2.4000 at step 40" in es.reason


def test_min_delta_and_non_finite_losses_are_not_improvements() -> None:
    es = EarlyStopping(patience=3, min_delta=0.1)
    assert es.observe(1, math.nan) is False  # a NaN never becomes the best
    assert es.observe(2, 3.0)
    assert not es.observe(3, 2.95)  # better, but not by more than min_delta
    assert not es.observe(4, math.inf)
    assert es.best == 3.0 and es.bad_evals == 2 and not es.should_stop
    assert es.observe(5, 2.89)


def test_off_never_stops_nor_marks_a_best() -> None:
    es = EarlyStopping(patience=0, min_delta=0.0)
    assert not any(es.observe(s, 10.0 - s) for s in range(5))
    assert not any(es.observe(s, 10.0 + s) for s in range(5, 50))
    assert not es.should_stop and es.best is None


def test_state_round_trip_counts_on_and_settings_decide() -> None:
    a = EarlyStopping(patience=3, min_delta=0.0)
    for s, v in [(1, 2.0), (2, 2.1), (3, 2.2)]:
        a.observe(s, v)
    state = json.loads(json.dumps(a.state_dict()))  # it travels in train_state.json
    b = EarlyStopping(patience=3, min_delta=0.0)
    b.load_state_dict(state)
    assert not b.observe(4, 2.3) and b.should_stop  # the third bad one, counted across resume
    # The same state with more patience (or early stopping off) trains on.
    assert not _loaded(EarlyStopping(patience=5, min_delta=0.0), b.state_dict()).should_stop
    assert not _loaded(EarlyStopping(patience=0, min_delta=0.0), b.state_dict()).should_stop
    c = EarlyStopping(patience=3, min_delta=0.0)
    c.load_state_dict(None)  # a checkpoint from before early stopping
    assert c.best is None and c.bad_evals == 0


def _loaded(es: EarlyStopping, state: dict[str, Any]) -> EarlyStopping:
    es.load_state_dict(state)
    return es


# ---- the best checkpoint: real saves of a real single-process engine ----------------------


@pytest.fixture
def parts(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=debug", "model.vocab_size=512"])
    engine = create_engine(cfg, accum=1)
    torch.manual_seed(0)
    engine.setup(
        GPT(GPTConfig(**cfg.model)), lambda m: build_optimizer(m, cfg.optim, engine.device)
    )
    state = TrainState(TokenLoader(tiny_data, "train", 64, 2), EarlyStopping(0, 0.0))
    yield cfg, engine, state
    reset_accelerate_state()


def checkpointer(run: Path, cfg: Any, keep_last: int, resume: str = "auto") -> Checkpointer:
    ckpt_cfg = CheckpointConfig(every=10, keep_last=keep_last, resume=resume)
    return Checkpointer(run, ckpt_cfg, to_dict(cfg), max_steps=1000)


def save_at(ck: Checkpointer, step: int, engine: Any, state: TrainState, best: bool = False) -> str:
    state.step = step
    return ck.save(engine, state, best=best)


def names(run: Path) -> list[str]:
    return [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")]


def test_best_survives_pruning_and_every_checkpoint_names_it(parts: Any, tmp_path: Path) -> None:
    cfg, engine, state = parts
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    ck = checkpointer(run, cfg, keep_last=1)
    assert ck.due(7, best=True) and not ck.due(7)
    for step, best in [(10, True), (20, False), (30, False)]:
        save_at(ck, step, engine, state, best=best)
    assert names(run) == ["step_0000010", "step_0000030"]  # keep_last=1, and the best
    assert checkpoint.read_pointer(root, "best") == "step_0000010"
    states = [json.loads((root / n / "train_state.json").read_text()) for n in names(run)]
    assert [s["best_checkpoint"] for s in states] == ["step_0000010"] * 2
    save_at(ck, 40, engine, state, best=True)
    save_at(ck, 50, engine, state)
    # The old best went at the first save after it lost the title.
    assert names(run) == ["step_0000040", "step_0000050"]
    assert (
        checkpoint.resolve(run / "best")
        == checkpoint.resolve(root / "best")
        == root / "step_0000040"
    )
    assert checkpoint.resolve(run / "latest") == checkpoint.resolve(run) == root / "step_0000050"


def test_resume_marks_the_best_again(parts: Any, tmp_path: Path) -> None:
    """A crash between a save and the `best` pointer leaves the pointer one best behind, and
    resuming an older checkpoint moves a newer best aside: either way the resumed checkpoint's
    train state says which one is best, and that one is marked."""
    cfg, engine, state = parts
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    ck = checkpointer(run, cfg, keep_last=3)
    save_at(ck, 10, engine, state, best=True)
    save_at(ck, 20, engine, state)
    save_at(ck, 30, engine, state, best=True)
    checkpoint.write_pointer(root, "best", root / "step_0000010")  # as if killed before it moved
    again = checkpointer(run, cfg, keep_last=3)
    again.restore(again.resume_point(), engine, state)
    assert checkpoint.read_pointer(root, "best") == "step_0000030" == again.best

    older = checkpointer(run, cfg, keep_last=3, resume=str(root / "step_0000020"))
    found = older.resume_point()  # moves step 30, the best, aside: the pointer goes with it
    assert names(run) == ["step_0000010", "step_0000020"]
    assert not (root / "best").exists()
    older.restore(found, engine, state)
    assert checkpoint.read_pointer(root, "best") == "step_0000010" == older.best


def test_resolve_without_a_best_says_how_best_is_made(parts: Any, tmp_path: Path) -> None:
    cfg, engine, state = parts
    run = tmp_path / "run"
    save_at(checkpointer(run, cfg, keep_last=2), 10, engine, state)
    for name in (run / "best", run / "checkpoints" / "best"):
        with pytest.raises(CheckpointError, match=r"no best checkpoint.*early_stop_patience"):
            checkpoint.resolve(name)
    with pytest.raises(CheckpointError, match="neither a complete checkpoint"):
        checkpoint.resolve(tmp_path / "elsewhere")
