"""`python -m pretrain.train experiment=<name> [overrides]`: the training command.

This module is the command line only: Hydra's entry point, a sweep's trial glue and the exit
status. The run itself is `pretrain.training.loop.train(cfg)`.

Exit status: 0 when max_steps (or train.stop_at_step) is reached or early stopping ends the run
(`train.early_stop_patience`: saved, `best` marked); 75 (EX_TEMPFAIL) after
SIGTERM/SIGUSR1, acted on at the next logging step with a checkpoint saved, so that a launcher
requeues the job; 130 after Ctrl-C (SIGINT), saved the same way (a second Ctrl-C within 5 s
stops at once, unsaved, also 130); 1 with a one-line message for a bad config, bad data, a NaN loss, a failed
checkpoint save, or W&B that cannot start with logging.wandb_mode=online. In a multirun (`-m`,
pretrain/sweep/) a trial's result or failure goes to the sweeper instead, which goes on (or
stops, as configured); a preempted trial still ends the whole sweep with 75.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from pretrain import checkpoint, dist
from pretrain.config import ConfigError, check_overrides
from pretrain.data.shards import DataError
from pretrain.engine import process_group
from pretrain.metrics import WandbUnavailable
from pretrain.sweep import trial as sweep_trial
from pretrain.training.guards import EXIT_INTERRUPTED, EXIT_REQUEUE, NonFiniteLoss
from pretrain.training.loop import RunEnd, train

INTERRUPTED = "interrupted"  # run()'s error for a second Ctrl-C
# A full disk or quota, or a file-size limit: said in one line, whatever was being written.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

EXPECTED_ERRORS = (
    ConfigError,
    DataError,
    checkpoint.CheckpointError,
    NonFiniteLoss,
    WandbUnavailable,
)


def run(cfg: DictConfig) -> tuple[RunEnd | None, str]:
    """`train`, with expected failures turned into (None, their message)."""
    interrupted = False
    try:
        if cfg.sweep.dir:
            sweep_trial.check(cfg)
            sweep_trial.claim_run_dir(cfg)  # a trial only ever continues as itself
        return train(cfg), ""  # type: ignore[arg-type]
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C twice: at once, unsaved, one line
            interrupted = True
            print(
                "interrupted twice: stopped at once without saving; the last checkpoint is kept "
                "and the same command continues from it",
                file=sys.stderr,
                flush=True,
            )
            return None, INTERRUPTED
        # Every rank learns of the failure at once (dist.watch_peers); only the job's first
        # failure is reported: later ones on other ranks are its consequences.
        first = dist.report_failure(f"{type(e).__name__}: {e}")
        if isinstance(e, OSError) and e.errno in FULL_DISK:
            if first:
                print(
                    f"error: the disk is full writing {e.filename or 'a file'} ({e.strerror}): "
                    "free space under run.dir (or point run.dir at a volume with room), then run "
                    "the same command; the run dir's files were written whole or not at all",
                    file=sys.stderr,
                    flush=True,
                )
            return None, f"OSError: {e.strerror}"
        if not isinstance(e, EXPECTED_ERRORS):
            if first:
                raise  # a bug: Hydra prints the traceback
        elif first:
            # Expected failures get their message, not a traceback.
            print(f"error: {e}", file=sys.stderr, flush=True)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        if not interrupted:  # (a second Ctrl-C stops at once: its write is abandoned)
            checkpoint.settle()  # a background write in flight ends before its process group
        process_group.destroy()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _main(cfg: DictConfig) -> float | None:
    """One run; in a multirun (`-m`), one trial, whose objective goes back to the sweeper."""
    multirun = sweep_trial.in_multirun()
    if multirun:
        sweep_trial.prepare(cfg)  # its own run dir, a W&B run in the sweep's group
    # srun started every rank itself (Hydra's submitit launcher)
    process_group.adopt_slurm_tasks()
    started = time.time()
    # Hydra's basic launcher runs the next trial in this same process.
    with sweep_trial.restored_process() if multirun else contextlib.nullcontext():
        end, error = run(cfg)
        code = (EXIT_INTERRUPTED if error == INTERRUPTED else 1) if end is None else end.exit_code
        result = None
        if code == 0 and end is not None and cfg.sweep.dir:  # still holding the trial's dir
            result = sweep_trial.finish(cfg, end.step, end.tokens_seen, end.pruned, started)
    if result is not None and multirun:
        return sweep_trial.returned(result)
    if code and multirun and code != EXIT_REQUEUE:
        # The sweeper records a failed trial and goes on (or stops, as it is configured).
        raise sweep_trial.TrialFailed(f"error: trial in {cfg.run.dir} failed: {error}")
    # os._exit would skip W&B's flush; sys.exit after teardown is safe.
    sys.stdout.flush()
    if code:
        sys.exit(code)  # a preempted sweep stops as a whole, to be continued by re-running it
    return None


def main() -> None:
    argv = sys.argv[1:]
    if any(a in ("-m", "--multirun") for a in argv) and several_processes():
        sys.stderr.write(
            "error: a sweep (-m) runs in one process: started on every rank, each rank would "
            "choose its own parameters. Run it with plain `python -m pretrain.train -m ...` and "
            "let each trial start its processes: hydra/launcher=torchrun "
            "hydra.launcher.nproc_per_node=N, or hydra/launcher=submitit_slurm on Slurm\n"
        )
        raise SystemExit(2)
    check_overrides(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    _main()


def several_processes() -> bool:
    """Whether this process is one of several ranks started together (torchrun, srun -n N)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1


if __name__ == "__main__":
    main()
