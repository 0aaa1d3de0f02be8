"""Early stopping on the validation loss: the decision, and the state a checkpoint carries.

With `train.early_stop_patience=P` (0 = off) the run stops once P evaluations in a row have not
improved on the best validation loss by more than `train.early_stop_min_delta`. The loop asks
`observe` after each evaluation (is this a new best? then a checkpoint is due and is marked
`best`) and `should_stop` after saving. The counters travel in every checkpoint's train state,
so a preempted run counts on where it left off, and a run that stopped early stays stopped when
it is resumed with the same settings (`checkpoint.resume=auto` does not train on).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.config import TrainConfig


class EarlyStopping:
    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None  # best validation loss so far
        self.best_step: int | None = None
        self.bad_evals = 0  # evaluations since the best one

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> EarlyStopping:
        """`train.early_stop_patience` and `train.early_stop_min_delta`."""
        return cls(cfg.early_stop_patience, cfg.early_stop_min_delta)

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def observe(self, step: int, val_loss: float) -> bool:
        """Record the evaluation at `step`. True when it is a new best (only when enabled: a
        best checkpoint is then due). A NaN/inf loss never improves."""
        if not self.enabled:
            return False
        if math.isfinite(val_loss) and (self.best is None or val_loss < self.best - self.min_delta):
            self.best, self.best_step, self.bad_evals = val_loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.bad_evals >= self.patience

    @property
    def reason(self) -> str:
        best = f"{self.best:.4f} at step {self.best_step}" if self.best is not None else "none"
        return (
            f"the validation loss has not improved by more than {self.min_delta:g} for "
            f"{self.bad_evals} evaluations (train.early_stop_patience={self.patience}; best "
            f"{best})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """From a checkpoint's train state (None: one written without early stopping state,
        which starts counting afresh)."""
        if state:
            self.best, self.best_step = state["best"], state["best_step"]
            self.bad_evals = int(state["bad_evals"])
