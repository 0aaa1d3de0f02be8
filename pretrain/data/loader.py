"""TokenLoader: streams packed (x, y) batches from prepared shards, resumable and elastic.

The order: a pure function of (seed, epoch, manifest, seq_len)
    The train (or val) split has n shards. Epoch e visits them in the order
    `shard_order(seed, e, n)`; all three orders below change every epoch. Concatenating an
    epoch's shard orders gives an endless sequence of *units*: unit u is shard
    `shard_order(seed, u // n, n)[u % n]` of epoch u // n. Inside unit u (shard s, epoch e) the
    documents are concatenated in the order `doc_order(seed, e, s, docs)` into the unit's
    *stream*, which is cut into N = tokens // (seq_len + 1) windows (see Packing); the unit's
    windows are read in the order `window_order(seed, e, s, N)`, a permutation: the k-th window
    read is stream[p[k] × (seq_len + 1) : (p[k] + 1) × (seq_len + 1)] with p that permutation.
    So a batch mixes windows from all over a shard (many documents), not one stretch of text;
    it draws from one shard (two where it spans units), so larger shards mix more.
    Nothing here depends on the world size, the number of workers or the batch size.

The split: ranks × workers take whole units, round-robin
    There are S = world_size × max(1, num_workers) *slots*; slot g = rank × W + worker. Slot g
    takes units g, g + S, g + 2S, ... So S must not exceed n (an error says so), every shard is
    read by exactly one process per epoch, and the rank/worker split is only a view on the order.

Packing: per unit, no overlap
    A unit's stream (documents, each already ending in EOS) is cut into non-overlapping windows
    of seq_len + 1 tokens, x = w[:-1], y = w[1:]: every token is in exactly one window. The
    last `tokens mod (seq_len + 1)` tokens of each unit's stream (< seq_len + 1) are in no
    window and dropped, so at most n × seq_len tokens per epoch. A worker fills a batch of
    batch_size windows from its units in the order above (a batch may span units, and, with
    loop=True, epochs), gathering the rows from the unit's [N, seq_len + 1] view of the stream
    (one copy per batch). loop=False ends the pass at the end of the epoch it started in and
    drops each slot's final partial batch: at most S × (batch_size − 1) × (seq_len + 1) more
    tokens. That is the whole loss: dropped ≤ n × seq_len + S × (batch_size − 1) × (seq_len + 1)
    tokens per epoch (tested).

State: what has been consumed, tracked in the main process
    Each slot's state is {"cur": [u, offset] | None, "queue": [[u, offset], ...], "next": u,
    "stride": S}: the unit being read, explicit units still to do, then units next,
    next + stride, ... An offset counts what of its unit is consumed: k windows read (the first
    k of the unit's window order) is offset k × (seq_len + 1), in tokens. Every batch carries
    its slot's state right after it, and the main process keeps the state of the last batch it
    *yielded*, so DataLoader prefetching never counts. state_dict() is that, per slot, plus
    which worker yields next. load_state_dict(all ranks' states):
      * same world size, workers, seq_len and batch_size: each rank takes its own slots back and
        the worker round-robin continues where it was: the batches are exactly those the
        uninterrupted run gives (exact resume).
      * otherwise, same seq_len (elastic): every unit not yet fully consumed by any old slot,
        with its offset, is listed in unit order and dealt round-robin to the new slots; units
        after that follow the usual round-robin. A unit's window order does not depend on who
        reads it, so the new reader goes on at window k of the same order: no token is read
        twice or skipped (beyond the packing tails).
      * another seq_len: the windows of a partly read unit are scattered over its stream, so its
        rest is not a set of windows of the new size. Such units count as done and the rest of
        them is dropped; everything else is dealt as above. That loses at most (the number of
        partly read units in the states) × (unit size) tokens: one unit per old slot, plus any
        partly read units an earlier elastic resume had queued and not reached yet (tested).
        Nothing is read twice.

Ranks yield about, not exactly, the same number of batches per epoch (units differ in size); with
loop=True each rank just goes on into its next epoch (`epoch` is the oldest epoch a rank still
has work in).
"""

from __future__ import annotations

import atexit
import copy
import signal
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.shards import (
    DataError,
    Manifest,
    check_local_shards,
    check_tokenizer,
    is_local,
    read_manifest,
    read_shard,
)

# /2: windows are read in `window_order` inside each unit (/1 read them in stream order).
STATE_FORMAT = "pretrain.TokenLoader/2"


def shard_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n shards of a split."""
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def doc_order(seed: int, epoch: int, shard: int, ndocs: int) -> np.ndarray:
    """The order of shard `shard`'s documents in epoch `epoch`."""
    return np.random.default_rng([seed, epoch, 1, shard]).permutation(ndocs)


def window_order(seed: int, epoch: int, shard: int, nwindows: int) -> np.ndarray:
    """The order in which epoch `epoch` reads the nwindows windows of shard `shard`'s stream."""
    return np.random.default_rng([seed, epoch, 2, shard]).permutation(nwindows)


@dataclass
class _Spec:
    """Everything a worker needs to turn units into batches (picklable)."""

    manifest: Manifest
    split: str
    seed: int
    seq_len: int
    batch_size: int
    allow_pipe: bool
    verify_sha256: bool

    def __post_init__(self) -> None:
        self.shards = self.manifest.shards(self.split)
        self.n = len(self.shards)
        self._orders: dict[int, np.ndarray] = {}
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def shard_of(self, u: int) -> int:
        e = u // self.n
        if e not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[e] = shard_order(self.seed, e, self.n)
        return int(self._orders[e][u % self.n])

    def unit_tokens(self, u: int) -> int:
        return self.shards[self.shard_of(u)].tokens

    def windows(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit u's windows [N, L + 1] (a view of its stream: its shard's documents in this
        epoch's order, concatenated, the tail cut off) and the order to read them in, [N]."""
        if self._cached is not None and self._cached[0] == u:
            return self._cached[1], self._cached[2]
        s, e, window = self.shard_of(u), u // self.n, self.seq_len + 1
        docs = read_shard(
            self.manifest,
            self.shards[s],
            allow_pipe=self.allow_pipe,
            verify_sha256=self.verify_sha256,
        )
        order = doc_order(self.seed, e, s, len(docs))
        flat = (
            np.concatenate([docs[i] for i in order])
            if docs
            else np.zeros(0, self.manifest.np_dtype)
        )
        nwin = len(flat) // window
        rows = flat[: nwin * window].reshape(nwin, window)
        self._cached = (u, rows, window_order(self.seed, e, s, nwin))
        return self._cached[1], self._cached[2]


class _Cursor:
    """A slot's position: the current unit and offset, the explicit queue, then the tail."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.cur: list[int] | None = list(state["cur"]) if state["cur"] is not None else None
        self.queue = deque(list(q) for q in state["queue"])
        self.next, self.stride = int(state["next"]), int(state["stride"])

    def advance(self) -> None:
        if self.queue:
            self.cur = self.queue.popleft()
        else:
            self.cur = [self.next, 0]
            self.next += self.stride

    def pending(self) -> Iterator[tuple[int, int]]:
        """Units still to read, with their start offsets, in order (endless)."""
        if self.cur is not None:
            yield self.cur[0], self.cur[1]
        yield from ((q[0], q[1]) for q in self.queue)
        u = self.next
        while True:
            yield u, 0
            u += self.stride

    def state(self) -> dict[str, Any]:
        return {
            "cur": list(self.cur) if self.cur is not None else None,
            "queue": [list(q) for q in self.queue],
            "next": self.next,
            "stride": self.stride,
        }


def _first_pending_epoch(spec: _Spec, state: dict[str, Any]) -> int:
    """Epoch of the first unit this slot still has a whole window in."""
    window = spec.seq_len + 1
    for k, (u, off) in enumerate(_Cursor(state).pending()):
        if spec.unit_tokens(u) - off >= window or k > 4 * spec.n + 4:
            return u // spec.n
    raise AssertionError("unreachable")


def _gather(parts: list[tuple[np.ndarray, np.ndarray]], rows: int) -> np.ndarray:
    """One batch [rows, L + 1] from (unit windows [N, L + 1], row indices [k]) parts: one copy."""
    if len(parts) == 1:
        windows, idx = parts[0]
        return windows[idx]
    out = np.empty((rows, parts[0][0].shape[1]), parts[0][0].dtype)
    i = 0
    for windows, idx in parts:
        np.take(windows, idx, axis=0, out=out[i : i + len(idx)])
        i += len(idx)
    return out


def _slot_batches(
    spec: _Spec, w: int, state: dict[str, Any], stop_epoch: int | None
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Batches of one slot: (windows [B, L + 1], {"w": w, "state": the slot's state after it})."""
    window, batch_size = spec.seq_len + 1, spec.batch_size
    cursor = _Cursor(state)
    if cursor.cur is None:
        cursor.advance()
    # The batch being filled: (a unit's windows [N, L + 1], which of its rows [k]) per unit.
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    have = 0
    idle = 0  # consecutive units without a whole window (shards smaller than seq_len + 1)
    while True:
        assert cursor.cur is not None
        u, off = cursor.cur
        if stop_epoch is not None and u // spec.n > stop_epoch:
            return  # one pass done; the partial batch in `parts` is dropped
        if (spec.unit_tokens(u) - off) // window <= 0:  # nothing left here (or nothing at all)
            idle += 1
            if idle > 2 * spec.n + 2:
                raise DataError(
                    f"no shard of split {spec.split!r} in {spec.manifest.source} has seq_len + 1 = "
                    f"{window} tokens: use a smaller seq_len or re-run prepare with a larger "
                    f"shard_tokens."
                )
        else:
            idle = 0
            windows, order = spec.windows(u)  # [N, L + 1] view of the stream, [N] permutation
            pos = off // window  # windows of this unit already consumed: order[:pos]
            while pos < len(order):
                take = min(batch_size - have, len(order) - pos)
                parts.append((windows, order[pos : pos + take]))
                have += take
                pos += take
                cursor.cur = [u, pos * window]
                if have == batch_size:
                    # [B, L + 1] in the shards' dtype (uint16: 4x less to pass between
                    # processes than int64; pickled through a pipe, cheaper than one shared
                    # memory segment per tensor for batches this size).
                    yield _gather(parts, batch_size), {"w": w, "state": cursor.state()}
                    parts, have = [], 0
        cursor.advance()


def _keep(item: Any) -> Any:
    return item


# DataLoader iterators whose workers are running (see _stop_workers_at_exit).
_live_iterators: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    # Workers ignore SIGTERM (below), and multiprocessing's own exit handler ends daemonic
    # children with SIGTERM and then joins them: without this it would wait forever when the
    # trainer exits with a batch stream still open (an error, or the end of training).
    # atexit runs last-in first-out, and this module registers after multiprocessing, so this
    # runs first.
    for it in list(_live_iterators):
        for w in getattr(it, "_workers", []):
            if w.is_alive():
                w.kill()


def _ignore_stop_signals(worker_id: int) -> None:
    # Slurm and `kill` deliver SIGTERM/SIGUSR1 to every process of a job, workers included.
    # Preemption is the training process's business (finish the step, save, exit); a worker
    # that died of the signal would crash it first. Workers exit when their parent does.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _RankDataset(IterableDataset):
    """One rank's slots as a torch IterableDataset: DataLoader worker j runs slot (j + rot) % W,
    so the DataLoader's round-robin over workers starts at the slot that yields next."""

    def __init__(
        self, spec: _Spec, slots: list[dict[str, Any]], rot: int, stop_epoch: int | None
    ) -> None:
        self.spec, self.slots, self.rot, self.stop_epoch = spec, slots, rot, stop_epoch

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        info = get_worker_info()
        j = info.id if info is not None else 0
        w = (j + self.rot) % len(self.slots)
        return _slot_batches(self.spec, w, self.slots[w], self.stop_epoch)


def plan_elastic(
    old_slots: list[dict[str, Any]],
    unit_tokens: Any,
    new_slots: int,
    *,
    drop_partial: bool = False,
) -> list[dict[str, Any]]:
    """Deal what the old slots have not consumed to `new_slots` new slots (see module doc).

    `unit_tokens(u)` gives unit u's token count. Units at or after the largest old `next` are
    untouched by everyone and continue round-robin; the rest that still hold tokens are listed
    explicitly, in unit order, with their offsets. drop_partial=True (another seq_len): units
    with a nonzero offset count as done and are not dealt."""
    cut = max(int(s["next"]) for s in old_slots)
    todo: list[tuple[int, int]] = []
    for s in old_slots:
        explicit = ([s["cur"]] if s["cur"] is not None else []) + list(s["queue"])
        todo += [
            (int(u), int(off))
            for u, off in explicit
            if off < unit_tokens(u) and not (drop_partial and off > 0)
        ]
        u = int(s["next"])
        while u < cut:
            todo.append((u, 0))
            u += int(s["stride"])
    todo.sort()
    if len({u for u, _ in todo}) != len(todo):
        raise DataError(
            "the loader states overlap (a unit is claimed twice); they are not one run's."
        )
    p = len(todo)
    slots: list[dict[str, Any]] = [
        {"cur": None, "queue": [], "next": cut + (j - p) % new_slots, "stride": new_slots}
        for j in range(new_slots)
    ]
    for i, (u, off) in enumerate(todo):
        slots[i % new_slots]["queue"].append([u, off])
    return slots


class TokenLoader:
    """Packed (x, y) batches of a prepared split for one rank; see the module docstring."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        loop: bool = True,
        allow_pipe: bool = False,
        verify_sha256: bool = False,
        expected_tokenizer_sha256: str | None = None,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        if num_workers < 0 or seed < 0:
            raise ValueError(f"num_workers={num_workers} and seed={seed} must be >= 0.")
        self._manifest = read_manifest(data_dir, allow_pipe=allow_pipe)
        if expected_tokenizer_sha256 is not None:
            check_tokenizer(self._manifest, expected_tokenizer_sha256)
        shards = self._manifest.shards(split)
        if is_local(data_dir):
            check_local_shards(self._manifest, split, verify_sha256=verify_sha256)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.loop = seed, loop
        self._W = max(1, num_workers)
        slots = world_size * self._W
        if len(shards) < slots:
            raise DataError(
                f"split {split!r} of {data_dir} has {len(shards)} shards, but {world_size} ranks × "
                f"{self._W} workers need at least {slots} (each reads whole shards): re-run prepare "
                f"with a smaller shard_tokens (val: val_shard_tokens), or use fewer workers."
            )
        # Local shards were hashed just above; remote ones are hashed as each is downloaded.
        remote_verify = verify_sha256 and not is_local(data_dir)
        self._spec = _Spec(
            self._manifest, split, seed, seq_len, batch_size, allow_pipe, remote_verify
        )
        per_epoch = self.windows_per_epoch
        if per_epoch < slots * batch_size:
            raise DataError(
                f"split {split!r} of {data_dir} packs into only {per_epoch} windows of "
                f"seq_len + 1 = {seq_len + 1} tokens per epoch, fewer than {slots} slots × "
                f"batch_size {batch_size}: use a smaller seq_len or batch_size, or more data."
            )
        self._slots: list[dict[str, Any]] = [
            {"cur": None, "queue": [], "next": rank * self._W + w, "stride": slots}
            for w in range(self._W)
        ]
        self._next_worker = 0

    # ---- facts

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def windows_per_epoch(self) -> int:
        """Windows of seq_len + 1 tokens in one epoch of the split, over all ranks."""
        return sum(s.tokens // (self.seq_len + 1) for s in self._manifest.shards(self.split))

    @property
    def epoch(self) -> int:
        """The oldest epoch this rank still has data of (all its shards of earlier epochs done)."""
        return min(_first_pending_epoch(self._spec, s) for s in self._slots)

    # ---- iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (x, y), both int64 [batch_size, seq_len], y = x shifted by one token (windows
        of seq_len+1 tokens). loop=True: epochs forever (epoch e+1 reshuffled); loop=False: one
        pass from the current position to the end of that epoch, then stop."""
        stop = None if self.loop else self.epoch
        source: Any
        if self.num_workers == 0:
            source = _slot_batches(self._spec, 0, copy.deepcopy(self._slots[0]), stop)
        else:
            dataset = _RankDataset(self._spec, copy.deepcopy(self._slots), self._next_worker, stop)
            source = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_keep,
                    prefetch_factor=2,
                    persistent_workers=False,
                    # Its own generator: starting workers must not draw from the global RNG,
                    # whose stream (dropout) a checkpoint restores exactly.
                    generator=torch.Generator().manual_seed(self.seed),
                    worker_init_fn=_ignore_stop_signals,
                )
            )
            _live_iterators.add(source)
        try:
            for rows, meta in source:
                # One int64 copy each for x and y, contiguous: [B, L].
                x = torch.from_numpy(rows[:, :-1].astype(np.int64))
                y = torch.from_numpy(rows[:, 1:].astype(np.int64))
                # Bookkeeping of what was *yielded*: prefetched batches never count.
                w = meta["w"]
                self._slots[w] = meta["state"]
                self._next_worker = (w + 1) % self._W
                yield x, y
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if stop is not None:
            self._skip_to(stop + 1)

    def _skip_to(self, epoch: int) -> None:
        """After a loop=False pass: drop what is left of epochs before `epoch` (the partial
        batches), so the next pass starts that epoch."""
        n = self._spec.n
        for i, s in enumerate(self._slots):
            cursor = _Cursor(s)
            cursor.cur = None
            cursor.queue = deque(q for q in cursor.queue if q[0] // n >= epoch)
            while cursor.next // n < epoch:
                cursor.next += cursor.stride
            self._slots[i] = cursor.state()

    # ---- state

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-serialisable; the position right after the last batch this rank yielded."""
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "dataset": self._manifest.fingerprint(self.split),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self._W,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "next_worker": self._next_worker,
            "slots": copy.deepcopy(self._slots),
        }

    def load_state_dict(self, states: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Takes the states of ALL ranks of the saving run (any world size / worker count). Same
        world size & workers: rank r continues exactly where rank r stopped (exact resume).
        Different world size, worker count or batch size: finish the epoch with no token repeated
        or lost (elastic resume). Different seq_len: the same, except that the rest of units the
        old run had partly read is dropped (see the module docstring)."""
        if isinstance(states, dict):
            states = [states]
        if not states:
            raise ValueError("load_state_dict needs the loader states of all ranks; got none.")
        first = states[0]
        for st in states:
            fmt = st.get("format")
            if fmt != STATE_FORMAT and str(fmt).startswith("pretrain.TokenLoader/"):
                raise DataError(
                    f"the loader state has format {fmt!r}, this version reads {STATE_FORMAT!r} "
                    f"(the order in which windows are read changed): resume with the version "
                    f"that saved it, or start the data from scratch."
                )
            if fmt != STATE_FORMAT:
                raise DataError(f"not a TokenLoader state (format {fmt!r}).")
            for key, mine in (
                ("split", self.split),
                ("dataset", self._manifest.fingerprint(self.split)),
                ("seed", self.seed),
            ):
                if st[key] != mine:
                    raise DataError(
                        f"the loader state was saved with {key}={st[key]!r}, this loader has "
                        f"{key}={mine!r}: resume with the same data, split and seed (or start the "
                        f"data from scratch)."
                    )
            for key in ("world_size", "num_workers", "seq_len", "batch_size"):
                if st[key] != first[key]:
                    raise DataError("the loader states come from different runs.")
        old_world = int(first["world_size"])
        ranks = sorted(int(st["rank"]) for st in states)
        if ranks != list(range(old_world)):
            raise DataError(
                f"load_state_dict needs the states of all {old_world} ranks of the saving run, "
                f"got ranks {ranks}."
            )
        by_rank: dict[int, dict[str, Any]] = {int(st["rank"]): st for st in states}
        same = (
            old_world == self.world_size
            and int(first["num_workers"]) == self._W
            and first["seq_len"] == self.seq_len
            and first["batch_size"] == self.batch_size
        )
        if same:
            own = by_rank[self.rank]
            self._slots = copy.deepcopy(own["slots"])
            self._next_worker = int(own["next_worker"])
            return
        old_slots = [slot for r in range(old_world) for slot in by_rank[r]["slots"]]
        plan = plan_elastic(
            old_slots,
            self._spec.unit_tokens,
            self.world_size * self._W,
            drop_partial=first["seq_len"] != self.seq_len,
        )
        self._slots = plan[self.rank * self._W : (self.rank + 1) * self._W]
        self._next_worker = 0

    def __repr__(self) -> str:
        return (
            f"TokenLoader({self._manifest.source!r}, split={self.split!r}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
            f"workers={self.num_workers}, epoch={self.epoch})"
        )
