"""Rank facts that need no process group, and one rank's failure stopping every rank.

`rank()`, `world_size()`, `local_rank()` and `is_main()` answer from torch.distributed once a
process group exists, else from the launcher's environment variables (torchrun's RANK,
WORLD_SIZE, LOCAL_RANK). Every rank-0-only side effect (printing: `log0`, writing files, W&B)
goes through `is_main()`; collectives are called on every rank. The second half is the watcher
that makes one rank's failure stop every rank (`report_failure`, `watch_peers`).

The process group's own life (the environment that describes it, starting it, ending it) is
`pretrain.engine.process_group`'s. torch.distributed is not imported here: a process group
cannot exist unless something else imported it, and the data-prep CLI starts faster without it.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _dist() -> Any:
    d = sys.modules.get("torch.distributed")
    return d if d is not None and d.is_available() and d.is_initialized() else None


def initialized() -> bool:
    return _dist() is not None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return rank() == 0


def log0(msg: str) -> None:
    """One line on stdout from global rank 0 only."""
    if is_main():
        print(msg, flush=True)


def barrier(group: Any = None) -> None:
    """Wait for every rank (of `group`: another process group over all ranks, such as the
    one background checkpoint writes use; default: the main one)."""
    d = _dist()
    if d is not None:
        d.barrier(group=group)


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj` (small and picklable: a loader position, an error report), in rank
    order, on every rank; a collective (over `group`, as for `barrier`). `[obj]` without a
    process group."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj, group=group)
    return out


def new_group() -> Any:
    """A second process group over all ranks, gloo (it carries small objects and DCP's
    planning from host memory), for collectives that run on another thread while the main
    thread's collectives go on (two threads must never share one group: their operations
    would pair up wrongly). None without a process group."""
    d = _dist()
    return None if d is None else d.new_group(backend="gloo")


# ---- one rank's failure stops every rank ---------------------------------------------------
#
# A rank that fails (an exception anywhere: bad data, a failed write, a bug in one forward)
# writes one key into the job's rendezvous store before it exits. Every rank runs a watcher
# thread that looks for that key every second and, once another rank has set it, ends its own
# process at once and quietly: the failing rank's message is the one the user reads, once.
# Without it the other ranks sit in their next collective until `dist.timeout_s` (NCCL never
# notices a dead peer; gloo does, but then every rank prints its own "Connection closed by
# peer" traceback on top of the real error).
#
# The watcher has a store connection of its own (a TCPStore client serves one request at a
# time) and polls with `check` rather than blocking in `wait`, so it is never stuck inside the
# store client when the process ends.

FAILED_KEY = "pretrain/failed"
EXIT_PEER_FAILED = 1
POLL_S = 1.0
_watch: dict[str, Any] = {"store": None, "thread": None, "stopping": None}


def _store_address() -> tuple[str, int] | None:
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host and port:
        return host, int(port)
    return None


def _connect(timeout_s: float) -> Any:
    address = _store_address()
    if address is None:
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(
        address[0], address[1], is_master=False, timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )  # fmt: skip


def report_failure(summary: str) -> bool:
    """Tell every rank that this one failed. True if this is the job's first failure (its
    message is the one to print), False if another rank failed first (this failure is most
    likely a consequence of that one: stay quiet). Best effort; True without peers."""
    store = _watch["store"]
    _stop_thread()
    if (
        store is None
        and world_size() > 1
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    ):
        # Failed before the watcher started (a config error on every rank, say): torchrun's
        # agent hosts the store already, so the ranks can still agree on who reports.
        try:
            store = _connect(10)
        except Exception:  # noqa: BLE001
            store = None
    if store is None:
        return True
    mine = f"{rank()}\n{summary[:2000]}".encode()
    try:
        # compare_set: sets the key only if it is absent (expected ""), returns what is stored.
        return bytes(store.compare_set(FAILED_KEY, "", mine)) == mine
    except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
        return True


def watch_peers() -> None:
    """Start the watcher (after the process group exists; a no-op without peers)."""
    if world_size() < 2 or _watch["thread"] is not None:
        return
    import threading

    try:
        store = _connect(30)
    except Exception as e:  # noqa: BLE001 - without it the collective timeout still applies
        print(f"warning: cannot watch other ranks for failures ({e})", file=sys.stderr)
        return
    if store is None:
        return
    me = rank()
    stopping = threading.Event()

    def watch() -> None:
        while not stopping.wait(POLL_S):
            try:
                if not store.check([FAILED_KEY]):
                    continue
                failed = bytes(store.get(FAILED_KEY)).decode(errors="replace").split("\n")[0]
            except Exception:  # noqa: BLE001 - the host of the store ended: so did the job
                if not stopping.is_set():
                    _stop(me, "the rendezvous store is gone (the process that hosted it ended)")
                return
            if failed != str(me) and not stopping.is_set():
                _stop(me, f"rank {failed} failed (see its message above)")
            return

    thread = threading.Thread(target=watch, name="pretrain-watch-peers", daemon=True)
    _watch.update(store=store, thread=thread, stopping=stopping)
    thread.start()


def await_peer_report(timeout_s: float = 10.0) -> None:
    """For a failure that every rank learns of together but another rank caused (a checkpoint
    write that failed elsewhere): give that rank's report time to arrive first, so that the
    message is printed by the rank it happened on. The watcher ends this process, quietly, as
    soon as the report is in; returns after `timeout_s` if none comes, or at once without a
    watcher."""
    thread = _watch["thread"]
    if thread is not None:
        thread.join(timeout_s)


def _stop(me: int, why: str) -> None:
    if me == 0:
        sys.stderr.write(f"rank 0: stopping: {why}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the main thread may be blocked inside a collective that never returns.
    os._exit(EXIT_PEER_FAILED)


def _stop_thread() -> None:
    thread, stopping = _watch["thread"], _watch["stopping"]
    if thread is not None and stopping is not None:
        stopping.set()
        thread.join()  # at most one store check: never left inside the client at exit
        _watch["thread"] = None


def stop_watching() -> None:
    """Before a clean end: peers that finish first must not look like failures."""
    _stop_thread()
