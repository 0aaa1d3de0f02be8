"""The training state: everything besides the engine's tensors that a run continues from.

A checkpoint holds the engine's tensors (model, optimizer, loss scaler: `Engine.state_dict`) and
this: the step, the tokens seen, the W&B run id, the early-stopping record, how many weights
are kept at zero, every rank's data-loader position and every rank's RNG states.
`TrainState.state_dict` gives the JSON part (`train_state.json`, one file for the run) and
`rng_state_dict` this rank's RNG tensors (`rng/rank_<r>.pt`); the checkpointer writes both and
gives them back to `load_state_dict` (`pretrain/checkpoint.py`).

Seeding is decided here too: a fresh run seeds each rank's generators from `run.seed` and its
rank (dropout differs per rank); a resumed run at the same world size takes the saved streams
over, so its dropout masks are those of the uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pretrain import dist
from pretrain.data.loader import TokenLoader
from pretrain.early_stopping import EarlyStopping
from pretrain.metrics import new_run_id


def rng_state() -> dict[str, torch.Tensor]:
    """This process's generators (torch, CUDA where present, Python's) as tensors only, so
    that a checkpoint never needs pickle to load them."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    # Python's generator as a tensor of its 625 words (+ position), so no pickle is needed.
    version, words, gauss = random.getstate()
    state["python"] = torch.tensor(list(words), dtype=torch.int64)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "python" in state:
        random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


@dataclass
class TrainState:
    """Where a run is. The loop advances it; the checkpointer saves and restores it whole."""

    loader: TokenLoader
    """The training data; its position is part of the state (every rank's, when saved)."""
    early_stopping: EarlyStopping
    """The validation record that early stopping decides on (best loss, its step, patience)."""
    strategy: str = ""
    """The strategy that writes the checkpoints (recorded, not needed to load them)."""
    step: int = 0
    tokens_seen: int = 0
    run_id: str = field(default_factory=new_run_id)
    """The W&B run id: the same run continues in the same run directory."""
    masked_weights: int = 0
    """Block matmul weights kept at zero (`train.keep_sparsity` with a pruned source)."""
    _rng: dict[str, torch.Tensor] | None = None  # saved streams, applied by `start`

    def seed(self, seed: int) -> None:
        """A fresh run's generators: `seed + 1 + rank` (the model's initial values are a pure
        function of `run.seed`, not of these; dropout differs per rank)."""
        torch.manual_seed(seed + 1 + dist.rank())

    def advance(self, tokens: int) -> None:
        """One optimizer step of `tokens` tokens (over all ranks) is done."""
        self.step += 1
        self.tokens_seen += tokens

    def sources_read(self, *, per_source: bool) -> dict[str, float]:
        """Per source of a mixture (`per_source`): tokens read by the whole run
        (`tokens/<name>`, cumulative) and epochs gone through (`epoch/<name>`, fractional: a
        small source over-sampled shows here); {} otherwise."""
        if not per_source:
            return {}
        tokens = {f"tokens/{k}": n * self.loader.seq_len for k, n in self.loader.consumed().items()}
        epochs = {f"epoch/{k}": e for k, e in self.loader.source_epochs().items()}
        return {**tokens, **epochs}

    def start(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches from the loader's position. The saved RNG streams are restored
        only now, the last thing before the first step, so that nothing done while setting up
        (building, loading, W&B) draws from them: the next step then draws exactly what the
        uninterrupted run drew at this step. (DataLoader workers have generators of their
        own.)"""
        batches = iter(self.loader)
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        return batches

    # ---- checkpoint form

    def state_dict(self) -> dict[str, Any]:
        """Collective: the JSON-able train state, with every rank's loader position (in rank
        order), so that a run at any world size can take the data order over."""
        return {
            "tokens_seen": self.tokens_seen,
            "epoch": self.loader.epoch,
            "wandb_run_id": self.run_id,
            "strategy": self.strategy,
            "early_stopping": self.early_stopping.state_dict(),
            "masked_weights": self.masked_weights,
            "step": self.step,
            "loader": dist.gather_objects(self.loader.state_dict()),
            "world_size": dist.world_size(),
        }

    def rng_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's generators, as tensors."""
        return rng_state()

    def load_state_dict(
        self, state: dict[str, Any], *, same_run: bool, rng: dict[str, torch.Tensor] | None
    ) -> None:
        """From a checkpoint: `state` as `state_dict` wrote it; `rng` this rank's saved streams,
        None when the checkpoint was saved at another world size (ranks then keep their fresh
        seeds). The W&B run and the early-stopping count continue only in the same run
        directory (`same_run`): a run branched from another run's checkpoint starts its own."""
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.masked_weights = int(state.get("masked_weights") or 0)
        self.loader.load_state_dict(state["loader"])
        if same_run:
            self.run_id = state["wandb_run_id"]
            self.early_stopping.load_state_dict(state.get("early_stopping"))
        self._rng = rng
