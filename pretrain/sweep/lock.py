"""`DirLock`: the exclusive file lock a sweep holds on its directory (`study.SweepLock`) and a
trial's rank 0 on its run directory (`trial.claim_run_dir`)."""

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
