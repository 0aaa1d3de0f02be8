"""In-loop validation: the val loaders (built once, when first needed), when validation is due,
and the decisions taken on its result: early stopping and the sweep's pruner.

Every rank evaluates the same val batches, the first `train.eval_batches` micro-batches of the
val split's stream (read again from its start at every validation, so that evaluations
compare): sharded strategies need every rank in every forward, and the val split is small. The
loss is the mean of those batches' mean losses (`pretrain.evaluation.loss`, the routine
`pretrain.eval` uses too), so it is already global; averaging it over ranks once more makes it
the same number on every rank, bit for bit, which the decisions taken on it (early stopping,
best checkpoints, the sweep's pruner) rely on.

A mixture (`data.mix`) is validated source by source, `train.eval_batches` of each source's own
val split: `val_loss/<name>` and `val_ppl/<name>`, and `val_loss` is their mean weighted by the
mixture (what early stopping and a sweep decide on).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import Config
from pretrain.data.loader import TokenLoader
from pretrain.early_stopping import EarlyStopping
from pretrain.engine import Engine
from pretrain.evaluation.loss import mean_loss
from pretrain.sweep.trial import Pruner
from pretrain.training.setup import RunData


@dataclass
class Validation:
    """One validation's result: the values logged and what was decided on them."""

    values: dict[str, float]  # val_loss, val_ppl
    new_best: bool  # early stopping's new best: a checkpoint is due, marked `best`
    pruned: bool  # the sweep's pruner stops this trial (the same answer on every rank)


class Validator:
    """Owns validation during training: `due(step)` says when, `run(step)` evaluates, logs, and
    feeds the result to early stopping (`stopped_early`, the signal the loop ends on) and to
    the sweep's pruner."""

    def __init__(
        self,
        engine: Engine,
        make_loaders: Callable[[], dict[str, TokenLoader]] | None,
        weights: dict[str, float],
        *,
        every: int,
        batches: int,
        max_steps: int,
        early_stopping: EarlyStopping,
        pruner: Pruner,
    ) -> None:
        self.engine, self.make_loaders, self.weights = engine, make_loaders, weights
        self.loaders: dict[str, TokenLoader] | None = None
        self.every, self.batches, self.max_steps = every, batches, max_steps
        self.early_stopping, self.pruner = early_stopping, pruner

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        data: RunData,
        engine: Engine,
        early_stopping: EarlyStopping,
        run_dir: Path,
    ) -> Validator:
        """`train.eval_every` and `train.eval_batches` decide when and how much. The val
        loaders (one per source) are built at the first validation (a run that never
        validates, or resumes at its end, never reads a val split), then kept. A trial of an
        Optuna sweep reports to its study."""

        def make_loaders() -> dict[str, TokenLoader]:
            return {
                source.name: TokenLoader(
                    source.manifest,
                    "val",
                    cfg.train.seq_len,
                    cfg.train.micro_batch,
                    seed=cfg.data.seed,
                    loop=False,
                    # As many partitions as val has windows (up to 1024): the first batches
                    # span it.
                    partitions=None,
                    allow_pipe=cfg.data.allow_pipe,
                )
                for source in data.sources
            }

        total = sum(source.weight for source in data.sources)
        return cls(
            engine,
            make_loaders if cfg.train.eval_batches > 0 else None,
            {source.name: source.weight / total for source in data.sources},
            every=cfg.train.eval_every,
            batches=cfg.train.eval_batches,
            max_steps=cfg.train.max_steps,
            early_stopping=early_stopping,
            pruner=Pruner(cfg, run_dir),
        )

    def due(self, step: int) -> bool:
        """Every `train.eval_every` steps (0 = never in between) and at the last step."""
        return self.make_loaders is not None and (
            (self.every > 0 and step % self.every == 0) or step == self.max_steps
        )

    @property
    def stopped_early(self) -> bool:
        """Early stopping's verdict: patience ran out (in this job or an earlier one)."""
        return self.early_stopping.should_stop

    @property
    def why_stopped(self) -> str:
        return self.early_stopping.reason

    def run(self, step: int, log: Callable[[int, dict[str, Any]], None]) -> Validation:
        """Collective: validation loss and perplexity at `step`, logged with `log` before
        anything is decided on them (a sweep's study that fails to answer loses no record)."""
        assert self.make_loaders is not None, "validation is off (train.eval_batches=0)"
        if self.loaders is None:
            self.loaders = self.make_loaders()
        losses = {name: self._loss(loader) for name, loader in self.loaders.items()}
        values: dict[str, float] = {}
        if "" in losses:  # one source: the figures of old
            val = losses[""]
        else:
            for name, loss in losses.items():
                values[f"val_loss/{name}"] = loss
                values[f"val_ppl/{name}"] = math.exp(min(loss, 50.0))
            val = sum(self.weights[name] * loss for name, loss in losses.items())
        values = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), **values}
        log(step, values)
        new_best = self.early_stopping.observe(step, val)
        pruned = self.engine.any_rank(self.pruner.report(step, values))
        return Validation(values, new_best, pruned)

    def _loss(self, loader: TokenLoader) -> float:
        """The mean loss of `loader`'s first batches, the same on every rank (a collective)."""
        loader.rewind()
        # Closed at once: a pass cut short releases the shards it loaded.
        with contextlib.closing(iter(loader)) as stream:
            batches = itertools.islice(stream, self.batches)
            mean = mean_loss(self.engine.eval_loss, batches, self.engine.device)
        return float(self.engine.all_reduce_mean(mean).item())
