"""`DirLock`: the exclusive file lock a sweep holds on its directory (`study.SweepLock`); and
the run directory's lock (`hold_run_dir`), which rank 0 of a training run takes
(`training.rundir`), or a sweep's trial first (`trial.claim_run_dir`): one process per run dir."""

from __future__ import annotations

import os
import time
from pathlib import Path


class DirLock:
    """An exclusive lock on `path` (fcntl.flock), released by the kernel when its holder ends or
    is killed: a lock left over by a killed process never blocks anyone."""

    def __init__(self, path: Path) -> None:
        self.path, self.file = Path(path), None

    def acquire(self) -> str | None:
        """None once held; else who holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return holder
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        f.write(f"pid {os.getpid()} on {os.uname().nodename}, started {started}\n")
        f.flush()
        self.file = f  # type: ignore[assignment]
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


RUN_LOCK = ".run.lock"
_runs: dict[Path, DirLock] = {}  # the run dirs this process holds


def hold_run_dir(path: Path) -> str | None:
    """None once this process holds run dir `path`'s lock (now, or already: a trial's run);
    else who holds it. The kernel releases it when its holder exits or is killed, so a crashed,
    killed or requeued run never blocks the next."""
    key = Path(path).resolve()
    if key in _runs:
        return None
    lock = DirLock(Path(path) / RUN_LOCK)
    holder = lock.acquire()
    if holder is None:
        _runs[key] = lock
    return holder


def holds_run_dir(path: Path) -> bool:
    return Path(path).resolve() in _runs


def release_run_dir(path: Path) -> None:
    lock = _runs.pop(Path(path).resolve(), None)
    if lock is not None:
        lock.release()
