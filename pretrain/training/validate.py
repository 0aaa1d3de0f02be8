"""In-loop validation: the val loader (built once), when validation is due, and the decisions
taken on its result.

Every rank evaluates the same val batches, the first `train.eval_batches` micro-batches of the
val split's stream (read again from its start at every validation, so that evaluations
compare): sharded strategies need every rank in every forward, and the val split is small. The
loss is the mean NLL per target token (`pretrain.evaluation.loss.total_nll`, the routine
`pretrain.eval` uses too), so it is already global; averaging it over ranks once more makes it
the same number on every rank, bit for bit, which the decisions taken on it (early stopping,
best checkpoints, the sweep's pruner) rely on.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import Config
from pretrain.data.format import Manifest
from pretrain.data.loader import TokenLoader
from pretrain.early_stopping import EarlyStopping
from pretrain.engine import Engine
from pretrain.evaluation.loss import total_nll
from pretrain.sweep.trial import Pruner


@dataclass
class Validation:
    """One validation's result: the values to log and what was decided on them."""

    values: dict[str, float]  # val_loss, val_ppl
    new_best: bool  # early stopping's new best: a checkpoint is due, marked `best`
    pruned: bool  # the sweep's pruner stops this trial (the same answer on every rank)


class Validator:
    """Owns validation during training: `due(step)` says when, `run(step)` evaluates and
    feeds the result to early stopping and to the sweep's pruner."""

    def __init__(
        self,
        engine: Engine,
        loader: TokenLoader | None,
        *,
        every: int,
        batches: int,
        max_steps: int,
        early_stopping: EarlyStopping,
        pruner: Pruner,
    ) -> None:
        self.engine, self.loader = engine, loader
        self.every, self.batches, self.max_steps = every, batches, max_steps
        self.early_stopping, self.pruner = early_stopping, pruner

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        manifest: Manifest,
        engine: Engine,
        early_stopping: EarlyStopping,
        run_dir: Path,
    ) -> Validator:
        """`train.eval_every` and `train.eval_batches` decide when and how much; the val
        loader is built here, once. A trial of an Optuna sweep reports to its study."""
        loader = None
        if cfg.train.eval_batches > 0:
            loader = TokenLoader(
                manifest,
                "val",
                cfg.train.seq_len,
                cfg.train.micro_batch,
                seed=cfg.data.seed,
                loop=False,
                # As many partitions as val has windows (up to 1024): the first batches span it.
                partitions=None,
                allow_pipe=cfg.data.allow_pipe,
            )
        return cls(
            engine,
            loader,
            every=cfg.train.eval_every,
            batches=cfg.train.eval_batches,
            max_steps=cfg.train.max_steps,
            early_stopping=early_stopping,
            pruner=Pruner(cfg, run_dir),
        )

    def due(self, step: int) -> bool:
        """Every `train.eval_every` steps (0 = never in between) and at the last step."""
        return self.loader is not None and (
            (self.every > 0 and step % self.every == 0) or step == self.max_steps
        )

    def run(self, step: int) -> Validation:
        """Collective: validation loss and perplexity at `step`, and the decisions on them."""
        assert self.loader is not None, "validation is off (train.eval_batches=0)"
        self.loader.rewind()
        batches = itertools.islice(self.loader, self.batches)
        nll, count = total_nll(self.engine.eval_loss, batches, self.engine.device)
        mean = (nll / count.clamp(min=1)).float()
        val = float(self.engine.all_reduce_mean(mean).item())
        values = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        new_best = self.early_stopping.observe(step, val)
        pruned = self.engine.any_rank(self.pruner.report(step, values))
        return Validation(values, new_best, pruned)
