"""Why a run stops, other than reaching `train.max_steps`, and what it says when it does.

Preemption       SIGTERM / SIGUSR1 set a flag; the ranks agree on it at a logging step,
                 save, and exit 75 so that a launcher requeues the job
DivergenceGuard  a NaN/inf loss (or gradient norm) stops the run before it can reach a
                 checkpoint, so the last good checkpoint survives
Stops            the early ends after a step, in one order, each with its message and exit
                 status: preemption, `train.stop_at_step`, early stopping, the sweep's pruner
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import BEST, Checkpointer
from pretrain.config import TrainConfig
from pretrain.engine import Engine
from pretrain.training.validate import Validator

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again", which launchers read as "requeue me"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C; launchers do not requeue it


class NonFiniteLoss(RuntimeError):
    pass


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; at the next logging step the loop saves and exits 75 (a
    launcher requeues the job). The first SIGINT (Ctrl-C) does the same but exits 130; a second
    one within INTERRUPT_AGAIN_S stops at once, unsaved (KeyboardInterrupt). Installed first
    thing in a run: a signal during a slow start-up must not kill it unsaved.

    Under torchrun one Ctrl-C reaches a rank twice: from the terminal (which signals the whole
    foreground process group) and again from torchrun, which passes the SIGINT it got on to its
    workers, milliseconds later. That copy is not a second Ctrl-C: there, one SIGINT within
    SAME_CTRL_C_S of the first is taken for it (when the two arrive together, Python runs the
    handler once: no copy is seen)."""

    INTERRUPT_AGAIN_S = 5.0
    SAME_CTRL_C_S = 1.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interrupted_at = 0.0
        self._copy_expected = "TORCHELASTIC_RUN_ID" in os.environ  # started by torchrun
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def _interrupt(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signum == signal.SIGINT:
            since = now - self._interrupted_at
            if self._copy_expected and since < self.SAME_CTRL_C_S:
                self._copy_expected = False
                return
            if since < self.INTERRUPT_AGAIN_S:
                raise KeyboardInterrupt
        self._interrupted_at = now
        if self.signum is None:
            self.signum = signum
            print(
                "interrupted: saving at the next logging step, then exiting (Ctrl-C again "
                f"within {self.INTERRUPT_AGAIN_S:.0f} s stops at once, unsaved)",
                file=sys.stderr,
                flush=True,
            )


class DivergenceGuard:
    """Remembers whether a loss, or a gradient norm where the engine does not expect non-finite
    ones (fp16's scaler skips such steps by design), was NaN/inf since the run started, or
    whether a loss exploded: above EXPLODED x ln(vocab_size), several times what a uniform
    guess scores, which no healthy run logs (weights read from a damaged file, a blow-up).

    `check` is a collective, called at logging and checkpoint steps only: a per-step one would
    stall the GPU queue. It raises before weights that saw a NaN can reach a checkpoint, so the
    last good checkpoint survives."""

    EXPLODED = 4.0

    def __init__(self, engine: Engine, vocab_size: int) -> None:
        self.engine = engine
        self.limit = self.EXPLODED * math.log(max(vocab_size, 2))
        self.bad = torch.zeros((), dtype=torch.bool, device=engine.device)
        self.since = 0  # steps since the last check

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(loss) | (loss.detach() > self.limit)
        if not self.engine.skips_overflow_steps:
            self.bad |= ~torch.isfinite(grad_norm.to(self.bad.device))
        self.since += 1

    def check(self, step: int, last_good: Callable[[], Path | None]) -> None:
        """Collective: stop the run (NonFiniteLoss) if any rank saw a bad loss since the last
        check, naming `last_good()` (asked only then)."""
        if self.engine.any_rank(bool(self.bad.item())):
            raise NonFiniteLoss(
                f"the loss became NaN/inf, or exploded past {self.limit:.1f} ({self.EXPLODED:g} x "
                f"a uniform guess's), between step {step - self.since} and step {step}. "
                f"Nothing was saved after it; the last good checkpoint is "
                f"{last_good() or 'none'}. Lower optim.lr, raise schedule.warmup_steps, use "
                "precision=bf16 instead of fp16, or check the data; then resume with "
                "checkpoint.resume=auto."
            )
        self.since = 0


@dataclass
class Stop:
    """An early end of the loop, decided after a step (the checkpoint it needs is saved
    before the loop acts on it)."""

    kind: str  # preempted, interrupted, stop_at_step, early_stop, pruned
    step: int
    exit_code: int
    detail: str = ""

    @property
    def pruned(self) -> bool:
        return self.kind == "pruned"

    def message(self, ckpt: Checkpointer) -> str:
        """What the run says as it stops (after the checkpoint was saved)."""
        if self.kind == "preempted":
            return f"preempted ({self.detail}) at step {self.step}: saved, exiting"
        if self.kind == "interrupted":
            return (
                f"interrupted (Ctrl-C) at step {self.step}: saved, exiting; the same command "
                "continues the run"
            )
        if self.kind == "stop_at_step":
            return f"train.stop_at_step={self.step} reached: saved, exiting"
        if self.kind == "early_stop":
            return (
                f"early stop at step {self.step}: {self.detail}. Saved, exiting; the best "
                f"checkpoint is {ckpt.root / BEST} -> {ckpt.best}"
            )
        return f"pruned at step {self.step}: the sweep's pruner stopped this trial; saved"


class Stops:
    """Which early end, if any, applies after a step. One place for their order: a preemption
    signal first (exit 75 to be requeued, or 0 at the last step, where nothing is left to
    requeue for), then `train.stop_at_step` (0), then early stopping (0, the validator's
    verdict), then the sweep's pruner (0)."""

    def __init__(
        self,
        engine: Engine,
        preemption: Preemption,
        validator: Validator,
        *,
        stop_at_step: int,
        max_steps: int,
    ) -> None:
        self.engine, self.preemption, self.validator = engine, preemption, validator
        self.stop_at_step, self.max_steps = stop_at_step, max_steps

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, engine: Engine, preemption: Preemption, validator: Validator
    ) -> Stops:
        """`train.stop_at_step` and `train.max_steps`; the signals and early stopping's verdict
        come from the run's own `Preemption` and `Validator`."""
        return cls(
            engine,
            preemption,
            validator,
            stop_at_step=cfg.stop_at_step,
            max_steps=cfg.max_steps,
        )

    def signalled(self) -> bool:
        """Collective: whether any rank has received a preemption signal. Asked at logging
        steps only (the ranks synchronise there anyway)."""
        return self.engine.any_rank(self.preemption.signum is not None)

    def before(self, step: int) -> str | None:
        """Why a run resumed at `step` has nothing to train, or None."""
        if 0 < self.stop_at_step <= step:
            return (
                f"nothing to train: the run is at step {step}, at or past train.stop_at_step="
                f"{self.stop_at_step}. To train on, raise it (or set it to 0)."
            )
        return None

    def after(self, step: int, *, preempted: bool, pruned: bool) -> Stop | None:
        if preempted:
            if self.preemption.signum == signal.SIGINT:
                return Stop("interrupted", step, EXIT_INTERRUPTED if step < self.max_steps else 0)
            code = EXIT_REQUEUE if step < self.max_steps else 0
            return Stop("preempted", step, code, f"signal {self.preemption.signum}")
        if 0 < self.stop_at_step <= step:
            return Stop("stop_at_step", step, 0)
        if self.validator.stopped_early:
            return Stop("early_stop", step, 0, self.validator.why_stopped)
        if pruned:
            return Stop("pruned", step, 0)
        return None
