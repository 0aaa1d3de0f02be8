"""`DirLock`: the exclusive file lock a sweep holds on its directory (`study.SweepLock`); and
the run directory's lock (`hold_run_dir`), which rank 0 of a training run takes
(`training.rundir`), or a sweep's trial first (`trial.claim_run_dir`): one process per run dir."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import IO

_held: dict[Path, DirLock] = {}  # the lock files this process holds


def holder_record() -> str:
    """Who holds a lock: this process's pid, host and start time; under Slurm also its job,
    node and restart count, so that a requeued job knows its own earlier instance."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    record = f"pid {os.getpid()} on {os.uname().nodename}, started {started}"
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        node = os.environ.get("SLURMD_NODENAME", "")
        where = f" on node {node}" if node and node != os.uname().nodename else ""
        record += f", Slurm job {job}{where} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')})"
    return record


class DirLock:
    """An exclusive lock on `path`, released by the kernel when its holder ends or is killed: a
    lock left over by a killed process never blocks anyone.

    A POSIX record lock (fcntl.lockf), not flock: it belongs to this process alone, so the
    processes it forks (DataLoader workers, which outlive a SIGKILLed trainer by a moment) never
    hold it, and a restart right after a kill is not refused. It also holds across the nodes of
    a shared file system that supports locks (NFS). Its one trap, closing any descriptor of the
    file in this process drops the lock, is why this process opens a lock file it holds nowhere
    else (`_held`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file: IO[str] | None = None
        self.record = ""  # what the lock file says while this process holds it

    def acquire(self) -> str | None:
        """None once held; else who holds it."""
        key = self.path.resolve()
        if key in _held:  # this process: reading the file would drop its lock
            return _held[key].record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held until release()
        if not _lock(f):
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return holder
        self._hold(f, key)
        return None

    def take_over(self) -> None:
        """Hold a new lock file in place of the one another process holds (a holder known to be
        gone whose lock the file system still keeps: a dead node's NFS lock). The new file is
        locked before it replaces the old one, so the path is never unlocked in between."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        f = open(tmp, "w+")  # noqa: SIM115 - held until release()
        if not _lock(f):  # a fresh file nobody else has opened
            f.close()
            raise OSError(f"could not lock {tmp}")
        os.replace(tmp, self.path)
        self._hold(f, self.path.resolve())

    def _hold(self, f: IO[str], key: Path) -> None:
        self.record = holder_record()
        f.seek(0)
        f.truncate()
        f.write(self.record + "\n")
        f.flush()
        self.file = f
        _held[key] = self

    def release(self) -> None:
        if self.file is not None:
            _held.pop(self.path.resolve(), None)
            self.file.close()
            self.file = None


def _lock(f: IO[str]) -> bool:
    import fcntl

    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        return False
    return True


RUN_LOCK = ".run.lock"
_runs: dict[Path, DirLock] = {}  # the run dirs this process holds


def hold_run_dir(path: Path) -> str | None:
    """None once this process holds run dir `path`'s lock (now, or already: a trial's run);
    else who holds it. The kernel releases it when its holder exits or is killed, so a crashed,
    killed or requeued run never blocks the next. A Slurm job requeued takes its run dir over
    from its own earlier instance even while that one's lock seems held (Slurm ended it before
    requeueing; a lock that outlives it is a dead node's, kept by a shared file system)."""
    key = Path(path).resolve()
    if key in _runs:
        return None
    lock = DirLock(Path(path) / RUN_LOCK)
    holder = lock.acquire()
    if holder is not None and _earlier_instance_of_this_job(holder):
        lock.take_over()
        print(
            f"{path}: taking the run dir over from this Slurm job's earlier instance ({holder}), "
            "which Slurm requeued",
            flush=True,
        )
        holder = None
    if holder is None:
        _runs[key] = lock
    return holder


def _earlier_instance_of_this_job(holder: str) -> bool:
    """Whether `holder` (a lock file's record) is this Slurm job before a requeue: the same job
    id with a lower restart count (two steps of one instance are refused like any two runs)."""
    job = os.environ.get("SLURM_JOB_ID")
    m = re.search(r", Slurm job (\S+)(?: on node \S+)? \(restart (\d+)\)$", holder)
    if not job or m is None or m.group(1) != job:
        return False
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > int(m.group(2))


def holds_run_dir(path: Path) -> bool:
    return Path(path).resolve() in _runs


def release_run_dir(path: Path) -> None:
    lock = _runs.pop(Path(path).resolve(), None)
    if lock is not None:
        lock.release()
