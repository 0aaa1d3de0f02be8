"""Atomic, portable checkpoints: everything needed to continue a run exactly.

Layout of `<run.dir>/checkpoints/`:

    step_0000200/
        dcp/                 model + optimizer (+ loss scaler), torch distributed checkpoint,
                             keyed by parameter name: loads at any world size and strategy
        rng/rank_<r>.pt      every rank's RNG states (tensors only)         } the training state
        train_state.json     step, tokens seen, every rank's data-loader  } (TrainState,
                             state, W&B run id, early stopping, ...        } training/state.py)
        config.yaml          the resolved config of the run that wrote it
        deepspeed/           (ZeRO strategies) DeepSpeed's own format, for `zero_to_fp32`
        checksums.json       size and CRC-32 of every file above (`verify`)
        COMPLETE             written last: a directory without it is not a checkpoint
    latest                   names the newest complete checkpoint; it moves last
    best                     names the checkpoint with the best validation loss (written when
                             early stopping is on); keep-last pruning never removes it

A save writes into `.tmp-step_.../`, syncs every file, and renames the directory into place
only when all ranks are done; a crash at any moment leaves the previous checkpoint and
`latest` untouched. Nothing is unpickled on load: tensors go through DCP or
`torch.load(weights_only=True)`, everything else is JSON or YAML.

Verified: once every rank's files are written, the ranks share out the files and compute each
one's CRC-32 (zlib's, ~1 GB/s per rank), and rank 0 records them in checksums.json before the
checkpoint becomes complete. Every reader checks them first (`verify`): a resume (the ranks
share out the check), `init_from`, export, eval, sample, compress. With `checkpoint.resume=
auto` a damaged checkpoint (a file changed, truncated or missing) is moved aside as
`damaged-step_...` with one line saying why, and the newest intact one is used; a named one
that is damaged stops the run. Checkpoints from before checksums.json existed load unchecked.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from pretrain import dist
from pretrain.config import CheckpointConfig
from pretrain.failpoint import failpoint

# DCP warns on every single-process save/load that it assumes a single process: it is right.
warnings.filterwarnings("ignore", message=".*assuming the intent is to")

COMPLETE = "COMPLETE"
CHECKSUMS = "checksums.json"
_CHUNK = 8 << 20
LATEST = "latest"
BEST = "best"
POINTERS = (LATEST, BEST)  # files in the checkpoint root that name one of its checkpoints


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            _fsync_file(Path(dirpath) / f)
        _fsync_file(Path(dirpath))


def _write_text(path: Path, text: str) -> None:
    """Write and fsync (so that a rename after it publishes complete bytes)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "train_state.json").is_file()


def _crc(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of a file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _files(path: Path) -> list[str]:
    """Every file of a checkpoint directory (relative, sorted), the bookkeeping ones aside."""
    skip = {COMPLETE, CHECKSUMS}
    return sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name not in skip
    )


def _check(path: Path, listed: dict[str, list[int]], names: list[str]) -> str | None:
    for name in names:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size, crc = _crc(f)
        if size != listed[name][0]:
            return f"{name} has {size:,} bytes, {listed[name][0]:,} were written (truncated?)"
        if crc != listed[name][1]:
            return f"{name} does not hold the bytes that were written (CRC-32 differs)"
    return None


def verify(path: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when checkpoint `path` is intact; else what is wrong, in a few words. `share`
    (r, n): check only the files r, r + n, ... (a rank's part of a collective check)."""
    if not (path / "dcp" / ".metadata").is_file():
        return "dcp/.metadata is missing"
    try:
        listed = json.loads((path / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        return None  # written before checkpoints had checksums: nothing to check against
    except (ValueError, KeyError):
        return f"{CHECKSUMS} is damaged"
    names = sorted(listed)
    return _check(path, listed, names[share[0] :: share[1]])


def verify_collective(path: Path) -> str | None:
    """Collective `verify`: every rank checks its share of the files; all get the verdict."""
    problems = dist.gather_objects(verify(path, (dist.rank(), dist.world_size())))
    return next((p for p in problems if p is not None), None)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def find_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `none`, `auto` (newest complete one) or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        return resolve(resume)
    # The newest complete checkpoint wins. `latest` names it too, except in the instant
    # between a checkpoint's rename and `latest` moving: a crash there leaves `latest` one
    # behind, and the newer checkpoint is complete, so it is the right one to resume.
    found = list_checkpoints(root)
    return found[-1] if found else None


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def read_pointer(root: Path, name: str) -> str | None:
    """The checkpoint directory name a pointer file (`latest`, `best`) in `root` holds."""
    try:
        return (root / name).read_text().strip() or None
    except OSError:
        return None


def write_pointer(root: Path, name: str, target: Path) -> None:
    """Rank 0: point `root/name` at checkpoint `target` (atomically: a reader sees the old or
    the new name, never a torn one)."""
    _write_text(root / f".{name}.tmp", target.name + "\n")
    os.replace(root / f".{name}.tmp", root / name)
    _fsync_file(root)


def prepare_root(root: Path, resume_from: Path | None, resume: str) -> None:
    """Rank 0, before anything is written: make `root` hold one timeline.

    Leftover `.tmp-*` directories of killed saves (and `.del-*` ones of cut-short prunes) are
    removed. Resuming from an older
    checkpoint of this same run moves the newer ones to `superseded-<step>/`, so that neither
    a later `resume=auto` nor keep-last pruning mixes the two timelines. Starting afresh
    (`resume=none`) over existing checkpoints is refused."""
    if not root.is_dir():
        return
    for tmp in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
        shutil.rmtree(tmp, ignore_errors=True)
    existing = list_checkpoints(root)
    if resume_from is None and existing:
        raise CheckpointError(
            f"checkpoint.resume={resume} but {root} already holds checkpoints (newest "
            f"{existing[-1].name}): use another run.dir for a fresh run, or "
            "checkpoint.resume=auto to continue this one"
        )
    if resume_from is not None and resume_from.parent.resolve() == root.resolve():
        newer = [p for p in existing if step_of(p) > step_of(resume_from)]
        if newer:
            aside = root / f"superseded-{step_of(resume_from)}"
            aside.mkdir(exist_ok=True)
            for p in newer:
                os.replace(p, aside / p.name)
            if read_pointer(root, BEST) in {p.name for p in newer}:
                (root / BEST).unlink()  # the resumed checkpoint says which one was best then
            _fsync_file(root)


def save(
    root: Path,
    step: int,
    state: dict[str, Any],
    train_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
    native_saver: Any = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    `state`: the engine's tensors (DCP); `train_state`: JSON, written by rank 0; `rng`: this
    rank's RNG streams (tensors), if any; `native_saver(dir)`: writes the backend's own files
    (collective). Every rank writes its part, then all ranks agree on whether every part was
    written before rank 0 publishes anything: a write that failed on any rank raises
    CheckpointError on every rank, and that checkpoint never becomes complete or `latest`."""
    final, tmp = begin(root, step)
    native = None if native_saver is None else lambda: native_saver(str(tmp / NATIVE))
    return write(Pending(root, final, tmp, state, train_state, config, keep_last, rng, native))


NATIVE = "deepspeed"  # the backend's own files, inside a checkpoint


def begin(root: Path, step: int) -> tuple[Path, Path]:
    """Collective: rank 0 makes the empty `.tmp-step_...` directory a save writes into.
    Returns (final, tmp) directories."""
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    try:
        if dist.is_main():
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # a previous attempt that died half way
            (tmp / "rng").mkdir(parents=True)
    except OSError as e:
        _give_up(root, tmp, final, _describe(e))
    dist.barrier()
    return final, tmp


@dataclass
class Pending:
    """One checkpoint on its way to disk: what `write` writes into `tmp`, then publishes as
    `final`. Its tensors are the engine's own (a synchronous save) or copies staged in host
    memory (a background one), and `native` writes the backend's files (or its staged
    copies)."""

    root: Path
    final: Path
    tmp: Path
    state: dict[str, Any]
    train_state: dict[str, Any]
    config: dict[str, Any]
    keep_last: int
    rng: dict[str, torch.Tensor] | None = None
    native: Callable[[], None] | None = None


def write(job: Pending, group: Any = None) -> Path:
    """Collective over `group` (None: the main process group): write every rank's files of
    `job`, agree that all were written, checksum them, and publish the checkpoint (rank 0:
    COMPLETE, the rename into place, `latest`, keep-last pruning). Returns the final
    directory. Runs on the main thread (a synchronous save) or on the background writer's
    thread with a process group of its own."""
    root, final, tmp = job.root, job.final, job.tmp
    local_error: str | None = None
    failed_here = False  # this rank's own write failed (DCP reports every rank's failures)
    try:
        dcp.save(job.state, checkpoint_id=str(tmp / "dcp"), process_group=group)
        failpoint("checkpoint.write")
        if job.rng is not None:
            torch.save(job.rng, tmp / "rng" / f"rank_{dist.rank()}.pt")
            _fsync_file(tmp / "rng" / f"rank_{dist.rank()}.pt")
        if job.native is not None:
            job.native()
    except (OSError, RuntimeError, CheckpointException) as e:
        if isinstance(e, CheckpointException) and any(
            isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()
        ):  # Ctrl-C twice during the write: an interruption, not a failed disk
            if dist.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise KeyboardInterrupt from e
        # torch.save reports a failed write as RuntimeError, DCP as CheckpointException.
        local_error = _describe(e)
        failed_here = not isinstance(e, CheckpointException) or dist.rank() in e.failures
    # every rank's outcome, in rank order
    reports = dist.gather_objects({"error": local_error}, group)
    failed = [rep["error"] for rep in reports if rep["error"] is not None]
    if failed:
        if not failed_here:
            if dist.is_main():
                shutil.rmtree(tmp, ignore_errors=True)  # before the failing rank's report ends us
            dist.await_peer_report()  # the rank whose write failed says so, not this one
        _give_up(root, tmp, final, "; ".join(dict.fromkeys(failed)))  # each cause once
    failpoint("checkpoint.after_tensors")
    # Every rank's files are written: the ranks share out their checksums.
    names = [n for n in _files(tmp) if n not in ("train_state.json", "config.yaml")]
    mine = {n: list(_crc(tmp / n)) for n in names[dist.rank() :: dist.world_size()]}
    sums = {n: v for part in dist.gather_objects(mine, group) for n, v in part.items()}
    if dist.is_main():
        try:
            _write_text(tmp / "train_state.json", json.dumps(job.train_state, indent=1))
            _write_text(tmp / "config.yaml", yaml.safe_dump(job.config, sort_keys=False))
            for name in ("train_state.json", "config.yaml"):
                sums[name] = list(_crc(tmp / name))
            _write_text(tmp / CHECKSUMS, json.dumps({"algorithm": "crc32", "files": sums}))
            _fsync_tree(tmp)
            _write_text(tmp / COMPLETE, f"{step_of(final)}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_file(root)
            failpoint("checkpoint.before_latest")
            _write_text(root / f".{LATEST}.tmp", final.name + "\n")
            os.replace(root / f".{LATEST}.tmp", root / LATEST)
            _fsync_file(root)
            # Rename before deleting: a delete cut short must not leave a "complete" husk.
            best = read_pointer(root, BEST)  # kept whatever keep_last says
            prunable = [p for p in list_checkpoints(root) if p.name != best]
            keep = job.keep_last
            for old in prunable[:-keep] if keep > 0 else []:
                doomed = root / f".del-{old.name}"
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        except OSError as e:
            # Rank 0 alone fails here; the other ranks wait at the barrier below until the
            # failure report stops them (pretrain.dist.watch_peers).
            _give_up(root, tmp, final, _describe(e))
    dist.barrier(group)
    return final


def _describe(e: BaseException) -> str:
    """Which rank failed and why, in one line each (DCP reports every rank's failure at once,
    with tracebacks: keep the cause)."""
    if isinstance(e, CheckpointException):
        causes = []
        for r, (exc, _trace) in sorted(e.failures.items()):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            causes.append(f"on rank {r} ({type(exc).__name__}: {first})")
        return "; ".join(causes)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"on rank {dist.rank()} ({type(e).__name__}: {first})"


def _give_up(root: Path, tmp: Path, final: Path, what: str) -> None:
    previous = find_resume(root, "auto") if root.is_dir() else None
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(
        f"saving checkpoint {final} failed {what}. The previous checkpoint "
        f"({previous or 'none yet'}) is intact. Check free space, quotas and permissions "
        "under run.dir (or point run.dir at a volume with room), then resume with "
        "checkpoint.resume=auto."
    )


class Background:
    """Checkpoints written by a thread of their own (`checkpoint.async_save`), one at a time.

    `start` stages the state into host memory (`pretrain.engine.staging`: the only stall,
    with any wait for the write before), then a thread runs the same `write` as a
    synchronous save (at the process's priority: a lowered one starves the writer while
    training keeps every core busy, measured in BENCHMARKS.md): the same files, checksums,
    COMPLETE, rename and `latest`, after every rank's write succeeded. The thread's
    collectives go over a gloo process group of its own (`dist.new_group`): sharing the main
    one with the training step's collectives would pair operations of two threads wrongly. A
    failure (a full disk on one rank) is raised by the next `poll` or `wait` on the main
    thread, so the run stops as it does after a failed synchronous save; the last complete
    checkpoint stays. The thread is a daemon: a run that ends by an error, or by a second
    Ctrl-C, abandons the write (its `.tmp-` directory never becomes a checkpoint, and the next
    start removes it), as does a SIGKILL."""

    in_flight: set[Background] = set()  # every Background with a write under way

    def __init__(self) -> None:
        from pretrain.engine.staging import Stager

        self.group = dist.new_group()
        self.stager = Stager()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.path: Path | None = None
        self.began = 0.0  # when the write began (after staging)
        self.stall_s = 0.0  # how long staging held training up

    def start(
        self,
        root: Path,
        engine: Any,
        state: RunState,
        train_state: dict[str, Any],
        config: dict[str, Any],
        keep_last: int,
        complete: Callable[[Path], None],
    ) -> str:
        """Collective: wait for the write before it, stage this step's state, start writing
        it. Returns the lines for the log: the previous write's, if it had not been reported,
        and this one's path and stall (the wait included)."""
        t0 = time.perf_counter()
        done = self.wait()
        waited = time.perf_counter() - t0
        final, tmp = begin(root, state.step)
        staged = self.stager.stage(engine.state_dict())
        native = engine.stage_native(str(tmp / NATIVE))
        job = Pending(root, final, tmp, staged, train_state, config, keep_last,
                      state.rng_state_dict(), native)  # fmt: skip
        self.stall_s = time.perf_counter() - t0
        self.path, self.error, self.began = final, None, time.perf_counter()

        def run() -> None:
            try:
                complete(write(job, self.group))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

        self.thread = threading.Thread(target=run, name="pretrain-checkpoint", daemon=True)
        Background.in_flight.add(self)
        self.thread.start()
        line = f"checkpoint {final} staged in {self.stall_s:.2f} s"
        if waited >= 0.01:
            line += f" ({waited:.2f} s of it waiting for the previous write)"
        return (f"{done}\n" if done else "") + line + ": writing in the background"

    def poll(self) -> str | None:
        if self.thread is None or self.thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> str | None:
        """Wait for the write in flight (if any). Returns its line, or raises its failure."""
        if self.thread is None:
            return None
        t0 = time.perf_counter()
        while self.thread.is_alive():
            self.thread.join(0.1)  # short joins: a second Ctrl-C is taken at once
        self.thread = None
        Background.in_flight.discard(self)
        if self.error is not None:
            raise self.error
        waited = time.perf_counter() - t0
        took = time.perf_counter() - self.began
        line = (
            f"saved checkpoint {self.path} (training stalled {self.stall_s:.2f} s; written in "
            f"the background in {took:.1f} s"
        )
        return line + (f"; waited {waited:.2f} s for it here)" if waited >= 0.01 else ")")


SETTLE_S = 300.0


def settle(timeout_s: float = SETTLE_S) -> None:
    """After an error (or before the error's message names the last good checkpoint): let a
    background write in flight finish, for up to `timeout_s`. What it writes was staged
    before the error, from a state that passed the loss checks, so it is worth keeping; and
    the process group must not be torn down under its collectives. Its own failure is not
    raised: the run is failing already. With a peer gone, its collectives fail at once (or
    the peer watcher ends this process): nothing waits for a dead rank."""
    for background in list(Background.in_flight):
        thread = background.thread
        if thread is not None:
            thread.join(timeout_s)
        if thread is None or not thread.is_alive():
            Background.in_flight.discard(background)
            background.thread = None


class RunState(Protocol):
    """What the checkpointer saves besides the engine: the training state (`TrainState`)."""

    step: int

    def state_dict(self) -> dict[str, Any]: ...  # JSON-able; a collective

    def rng_state_dict(self) -> dict[str, torch.Tensor]: ...  # this rank's RNG streams

    def load_state_dict(
        self, state: dict[str, Any], *, same_run: bool, rng: dict[str, torch.Tensor] | None
    ) -> None: ...


class Checkpointer:
    """The run's checkpoints: where they live, when one is due, what it holds, and which one a
    restarted run continues from. The loop only reports progress and asks.

    A save holds the engine's tensors in their portable form (`Engine.state_dict`), the training
    state (`TrainState`: step, tokens, run id, early-stopping record, every rank's data-loader
    position and RNG), the resolved config, and whatever the engine writes in its backend's own
    format (`Engine.save_native`). One is due every `checkpoint.every` steps, at the last step,
    whenever the loop must stop early (preemption, `train.stop_at_step`, early stopping) and at
    every new best validation loss when early stopping is on, never twice for the same step.
    The newest best is marked `best`; every checkpoint records which one that was
    (`best_checkpoint`), so a resumed run re-marks it."""

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any], max_steps: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.every, self.keep_last, self.resume = cfg.every, cfg.keep_last, cfg.resume
        self.config, self.max_steps = config, max_steps
        self.last_saved: int | None = None
        self.best: str | None = None  # name of the checkpoint marked `best`
        self.background: Background | None = None
        if getattr(cfg, "async_save", False):
            self.background = Background()  # a collective: every rank builds its checkpointer

    @classmethod
    def from_config(
        cls, cfg: CheckpointConfig, run_dir: Path, config: dict[str, Any], max_steps: int
    ) -> Checkpointer:
        """`checkpoint.*` decides cadence, retention and what to resume; the run supplies its
        directory, its resolved config (saved in every checkpoint) and its length."""
        return cls(run_dir, cfg, config, max_steps)

    def resume_point(self) -> Path | None:
        """Collective. The checkpoint to continue from (`checkpoint.resume`), verified (a
        damaged newest one is moved aside and the next older one taken, with `auto`), after
        rank 0 made the checkpoint directory hold one timeline (`prepare_root`)."""
        found = find_resume(self.root, self.resume)
        damaged: list[Path] = []
        while found is not None:
            problem = verify_collective(found)
            if problem is None:
                break
            if self.resume != "auto":
                raise CheckpointError(
                    f"checkpoint.resume={found} is damaged: {problem}. Resume from another "
                    "checkpoint (checkpoint.resume=<its dir>, or auto for the newest intact one)"
                )
            if dist.is_main():
                print(f"checkpoint {found} is damaged ({problem}): skipped", flush=True)
            damaged.append(found)
            older = [p for p in list_checkpoints(self.root) if step_of(p) < step_of(found)]
            found = older[-1] if older else None
        if dist.is_main():
            for bad in damaged:  # out of the timeline: never resumed, pruned or counted again
                os.replace(bad, bad.with_name(f"damaged-{bad.name}"))
            if damaged and read_pointer(self.root, BEST) in {b.name for b in damaged}:
                (self.root / BEST).unlink()
            prepare_root(self.root, found, self.resume)
        dist.barrier()
        return found

    def same_run(self, path: Path) -> bool:
        """Whether `path` is one of this run directory's own checkpoints (and not a branch
        point taken from another run)."""
        return path.parent.resolve() == self.root.resolve()

    def restore(self, path: Path, engine: Any, state: RunState) -> None:
        """Load the engine's tensors and the training state (`TrainState`) from `path`, in
        place. This rank's RNG streams come back only at the world size that saved them."""
        tensors = engine.state_dict()
        train_state = load(path, tensors)
        engine.load_state_dict(tensors)
        rng_file = path / "rng" / f"rank_{dist.rank()}.pt"
        rng = None
        if train_state.get("world_size") == dist.world_size() and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
        state.load_state_dict(train_state, same_run=self.same_run(path), rng=rng)
        self.last_saved = int(train_state["step"])
        # Another run's best is not this run's; our own is marked again in case a crash came
        # between a save and its pointer, or resuming an older checkpoint moved the best aside.
        best = train_state.get("best_checkpoint") if self.same_run(path) else None
        self.best = best if best and is_complete(self.root / best) else None
        if self.best and dist.is_main() and read_pointer(self.root, BEST) != self.best:
            self._mark_best(self.root / self.best)

    def due(self, step: int, *, stop: bool = False, best: bool = False) -> bool:
        if step == self.last_saved:
            return False
        return step % self.every == 0 or step == self.max_steps or stop or best

    def latest(self) -> Path | None:
        return find_resume(self.root, "auto")

    def last_good(self) -> Path | None:
        """The newest complete checkpoint once a background write in flight has settled (for
        a run that stops on an error: its message names it)."""
        settle()
        return self.latest()

    def save(self, engine: Any, state: RunState, *, best: bool = False) -> str:
        """Collective: every rank calls it. Saves the engine and the training state
        (`TrainState`) at its step, or with `checkpoint.async_save` stages them and writes in
        the background (after waiting for the save before it). `best`: this is the new best
        checkpoint. Returns the line to print."""
        if self.background is not None:  # one save at a time: the previous one's failure raises
            line = self.background.start(self.root, engine, state, self._train_state(state, best),
                                         self.config, self.keep_last, self._on_complete(best))  # fmt: skip
        else:
            t0 = time.perf_counter()
            final = save(self.root, state.step, engine.state_dict(), self._train_state(state, best),
                         self.config, self.keep_last, native_saver=engine.save_native,
                         rng=state.rng_state_dict())  # fmt: skip
            self._on_complete(best)(final)
            took = time.perf_counter() - t0
            line = f"saved checkpoint {final} in {took:.2f} s" + (" (best)" if best else "")
        self.last_saved = state.step
        if best:
            self.best = step_dir_name(state.step)
        return line

    def poll(self) -> str | None:
        """The line to print once a background save has completed (None: none has since the
        last call); raises its failure, as a synchronous save would have. Local, cheap: call it
        every step."""
        return self.background.poll() if self.background is not None else None

    def close(self) -> str | None:
        """At the end of the run (max_steps, early stopping, preemption, Ctrl-C): wait for the
        save in flight, raise its failure. Returns the line to print, if any."""
        return self.background.wait() if self.background is not None else None

    def _train_state(self, state: RunState, best: bool) -> dict[str, Any]:
        return {
            **state.state_dict(),
            "best_checkpoint": step_dir_name(state.step) if best else self.best,
        }

    def _on_complete(self, best: bool) -> Callable[[Path], None]:
        """What follows a checkpoint's completion: rank 0 marks a new best one `best`."""

        def complete(path: Path) -> None:
            if best and dist.is_main():
                self._mark_best(path)

        return complete

    def _mark_best(self, path: Path) -> None:
        try:
            write_pointer(self.root, BEST, path)
        except OSError as e:
            raise CheckpointError(
                f"marking {path} as the best checkpoint failed ({e}); the checkpoint itself is "
                f"complete, and its train_state.json names it best, so resuming marks it again. "
                "Check free space and permissions under run.dir."
            ) from e


def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Fill `state` (same structure as the engine's state_dict) in place from `path`.
    Returns the saved train_state."""
    meta = dcp.FileSystemReader(str(path / "dcp")).read_metadata()
    if "scaler" in state and not any(k.startswith("scaler.") for k in meta.state_dict_metadata):
        state.pop("scaler")  # saved without fp16: the loss scaler starts fresh
    # An optimizer hyperparameter newer than the checkpoint (optim.l1, say) is not in it: it keeps
    # its configured value (the optimizer keeps configured hyperparameters on load anyway).
    for i, group in enumerate(state.get("optim", {}).get("param_groups", [])):
        for key in [
            k for k in group if f"optim.param_groups.{i}.{k}" not in meta.state_dict_metadata
        ]:
            del group[key]
    try:
        # flatten_sharded_tensors=False: a rank that owns no part of a ZeRO-partitioned tensor
        # holds an empty ShardedTensor for it, which DCP's flattening would drop from its keys
        # (and then mistake the checkpoint for an old format). Nothing here is nested.
        planner = DefaultLoadPlanner(flatten_sharded_tensors=False)
        dcp.load(state, checkpoint_id=str(path / "dcp"), planner=planner)
    except (CheckpointException, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimizer ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). It was written by a run with "
            f"model: {read_config(path).get('model')}. Resume with that model config, or start "
            "a new run.dir."
        ) from e
    return json.loads((path / "train_state.json").read_text())


def read_config(path: str | Path) -> dict[str, Any]:
    """The resolved config a checkpoint was written with (any form `resolve` accepts)."""
    return yaml.safe_load((resolve(path) / "config.yaml").read_text())


def data_dir_of(path: str | Path) -> str | None:
    """The prepared data dir a checkpoint's run read: `data.dir`, or for a mixture its first
    source's (all sources share one tokenizer)."""
    data = read_config(path).get("data") or {}
    mix = data.get("mix") or {}
    if mix:
        return next(iter(mix.values())).get("dir") or None
    return data.get("dir") or None


def resolve(path: str | Path) -> Path:
    """The checkpoint directory that `path` names, for every consumer of checkpoints:

    <run dir>                          its newest complete checkpoint
    <run dir>/best, <run dir>/latest   the checkpoint that pointer names (`best`: the best
                                       validation loss, marked when early stopping is on)
    <run dir>/checkpoints/best|latest  the same, by the pointer file's own path
    <run dir>/checkpoints/step_*       that checkpoint
    """
    p = Path(path)
    if is_complete(p):
        return p
    if p.name in POINTERS:
        root = p.parent / "checkpoints" if (p.parent / "checkpoints").is_dir() else p.parent
        if p.name == LATEST:  # as resume=auto: the newest complete one (see find_resume)
            found = find_resume(root, "auto")
            if found is not None:
                return found
        else:
            target = read_pointer(root, BEST)
            if target is not None and is_complete(root / target):
                return root / target
            raise CheckpointError(
                f"{p}: no best checkpoint in {root}. `best` is marked by early stopping "
                "(train.early_stop_patience > 0) at each new best validation loss; pass the run "
                "directory for its newest checkpoint, or a checkpoints/step_* directory"
            )
    found = find_resume(p / "checkpoints", "auto") if (p / "checkpoints").is_dir() else None
    if found is None:
        raise CheckpointError(
            f"{p} is neither a complete checkpoint nor a run directory with one: pass a run "
            "directory, <run dir>/best, <run dir>/latest or a checkpoints/step_* directory"
        )
    return found


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict (as saved: fp32 master weights) from any checkpoint, saved
    under any strategy and world size, in this single process."""
    from pretrain.model import GPT, GPTConfig

    ckpt = resolve(path)
    problem = verify(ckpt)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {ckpt} is damaged: {problem}. Use another checkpoint of the run "
            f"({', '.join(p.name for p in list_checkpoints(ckpt.parent)) or 'none'})"
        )
    cfg = read_config(ckpt)
    model = GPT(GPTConfig(**cfg["model"]))
    sd = model.state_dict()
    # Load only the model's keys; the optimizer entries in the same checkpoint are skipped.
    state = {"model": sd}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    return state["model"]
