"""TokenLoader: packed (x, y) batches of a prepared split: one global order, any world size.

The global stream: a pure function of (seed, manifest split, seq_len L, partitions P)
    Windows. Epoch e visits the split's n shards in the order `shard_order(seed, e, n)`. Shard
    s's stream in epoch e is its documents in `doc_order(seed, e, s, docs)`, concatenated, cut
    into N_s = tokens_s // (L + 1) non-overlapping windows w of L + 1 tokens (x = w[:-1],
    y = w[1:]); its last tokens_s mod (L + 1) tokens are in no window. The epoch's *layout*
    lists all windows shard by shard in shard order, each shard's in `window_order(seed, e, s,
    N_s)`: N = sum of N_s windows (the same every epoch).
    Partitions. The layout is cut into P ranges of T = N // P consecutive windows; the last
    N mod P (< P) windows of the layout are in none and skipped this epoch. Slot p < P reads
    range `range_order(seed, e, P)[p]` in layout order.
    The stream interleaves the slots window by window: global window i belongs to epoch
    e = i // (P·T) and is slot (i mod P)'s window number (i mod P·T) // P. Epochs follow on.
    So consecutive windows come from different, randomly placed ranges of the epoch, and a
    batch mixes windows from all over the split (whose documents `prepare` shuffled over its
    shards) instead of one shard's text.

The split: ranks and workers are a view on the stream
    Rank r of R reads global windows r, r + R, r + 2R, ...: its local window q is global window
    q·R + r, and its batches are consecutive runs of batch_size local windows. So optimizer step
    k with gradient accumulation A reads local windows [k·B·A, (k + 1)·B·A) on every rank, i.e.
    global windows [k·G, (k + 1)·G) with G = B·A·R: the same windows for any world size, micro
    batch and accumulation with the same global batch G (their order inside the step differs;
    the loss is a mean over the step). R must divide P; with W DataLoader workers R·W must
    divide P. Then local window q is read by worker q mod W, and the reader (r, w) only ever
    reads the P / (R·W) slots p with p mod (R·W) = w·R + r.

Memory: a reader loads a shard when one of its slots first needs it in an epoch, and drops it
    after the last use by its slots. A slot reads one shard at a time, and at most one more can
    wait for it (the one straddling the end of its range, which the slot of the next range has
    already loaded). So a reader holds at most
        min(n, 2 × ⌈P / (R·W)⌉ + 1) shards × (max_s tokens_s × (itemsize + m) + 8 × max_s N_s)
    bytes, with itemsize 2 (uint16 ids) or 4, m = 1 when the data has loss masks (else 0), and
    8 bytes per window for its read order; plus one shard's tar bytes while it loads, and
    prefetched batches. `memory_bound_bytes()` evaluates it. A smaller P lowers it (for a new
    run: P is part of the order).

Packing and what is dropped: per epoch, each shard's tail (< L + 1 tokens) and N mod P < P
    windows; loop=False also drops each rank's final partial batch (< B windows). Every other
    window of the epoch is read exactly once, by exactly one rank (tested).

Fine-tuning data: when the manifest has loss masks, y = -1 where the target token is not a
    response token (prompt tokens), which the model's loss ignores.

State: one number. A rank's position is the count q of local windows it has yielded (prefetched
    batches never count); the run's global position g = q·R is the same on every rank at a step
    boundary. `load_state_dict(all ranks' states)` sets q = g / R' for the new world size R'
    (any workers, micro batch and accumulation), so a resumed run, elastic or not, continues
    the uninterrupted run's global stream exactly. With another seq_len the windows are others:
    the new run starts at the beginning of the next epoch (nothing read twice; the rest of the
    current epoch is skipped). Another P is refused (it is another order).
"""

from __future__ import annotations

import atexit
import pickle
import signal
import traceback
import weakref
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import DataConfig
from pretrain.data.format import DataError, Manifest
from pretrain.data.shards import (
    check_local_shards,
    check_tokenizer,
    is_local,
    read_manifest,
    read_shard,
)

# /3: one global stream over P partitions (/2 read whole shards per rank x worker slot).
STATE_FORMAT = "pretrain.TokenLoader/3"
# data.partitions' default: up to 1024 readers (128 GPUs x 8 workers, 256 x 4, ...).
DEFAULT_PARTITIONS = DataConfig.partitions


def shard_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` lays out the n shards of a split."""
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def doc_order(seed: int, epoch: int, shard: int, ndocs: int) -> np.ndarray:
    """The order of shard `shard`'s documents in epoch `epoch`."""
    return np.random.default_rng([seed, epoch, 1, shard]).permutation(ndocs)


def window_order(seed: int, epoch: int, shard: int, nwindows: int) -> np.ndarray:
    """The order in which epoch `epoch` lays out the nwindows windows of shard `shard`'s stream."""
    return np.random.default_rng([seed, epoch, 2, shard]).permutation(nwindows)


def range_order(seed: int, epoch: int, partitions: int) -> np.ndarray:
    """range_order(...)[p]: the range of the epoch's layout that slot p reads."""
    return np.random.default_rng([seed, epoch, 3]).permutation(partitions)


@dataclass
class _Spec:
    """The global stream of one split (picklable: DataLoader workers get a copy)."""

    manifest: Manifest
    split: str
    seed: int
    seq_len: int
    partitions: int
    allow_pipe: bool
    hash_reads: bool = True  # False only to measure what the sha256 check costs

    def __post_init__(self) -> None:
        self.shards = self.manifest.shards(self.split)
        self.n = len(self.shards)
        self.nwin = np.array([s.tokens // (self.seq_len + 1) for s in self.shards], np.int64)
        self.T = int(self.nwin.sum()) // self.partitions  # windows per slot per epoch
        self.per_epoch = self.T * self.partitions
        self._plans: dict[int, tuple[np.ndarray, ...]] = {}

    def plan(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Epoch e's layout: (shard order, each position's first and end layout index, the
        position of each shard, the slots' ranges)."""
        if e not in self._plans:
            if len(self._plans) > 3:
                self._plans.clear()
            perm = shard_order(self.seed, e, self.n)
            ends = np.cumsum(self.nwin[perm])
            self._plans[e] = (
                perm,
                ends - self.nwin[perm],
                ends,
                np.argsort(perm),
                range_order(self.seed, e, self.partitions),
            )
        return self._plans[e]  # type: ignore[return-value]

    def locate(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global windows i [k] -> (epoch [k], shard [k], index in the shard's window order [k])."""
        P, T = self.partitions, self.T
        e, j = np.divmod(i, P * T)
        p, t = j % P, j // P
        shard, m = np.empty_like(i), np.empty_like(i)
        for ep in np.unique(e).tolist():
            sel = e == ep
            perm, starts, ends, _, ranges = self.plan(ep)
            pos = ranges[p[sel]] * T + t[sel]  # index in the epoch's layout
            k = np.searchsorted(ends, pos, side="right")  # the shard position holding it
            shard[sel], m[sel] = perm[k], pos - starts[k]
        return e, shard, m

    def last_use(self, e: int, shard: int, slots: np.ndarray) -> int:
        """The last global window of epoch e in which one of `slots` reads `shard` (-1: none)."""
        P, T = self.partitions, self.T
        _, starts, ends, pos_of, ranges = self.plan(e)
        a, b = starts[pos_of[shard]], ends[pos_of[shard]]
        r0 = ranges[slots] * T
        lo, hi = np.maximum(a, r0), np.minimum(b, r0 + T)
        used = lo < hi
        if not used.any():
            return -1
        return int((e * P * T + (hi - 1 - r0) * P + slots)[used].max())


@dataclass
class _Held:
    """A loaded shard of one epoch: its windows [N, L + 1] (a view of its stream), their loss
    masks or None, the order they are laid out in [N], and the last global window using it."""

    rows: np.ndarray
    masks: np.ndarray | None
    order: np.ndarray
    last: int

    @property
    def nbytes(self) -> int:
        return (
            self.rows.nbytes + self.order.nbytes + (0 if self.masks is None else self.masks.nbytes)
        )


class _Reader:
    """Reads the windows of one (rank, worker): loads shards as its slots reach them, drops
    them after their last use (see Memory in the module docstring)."""

    def __init__(self, spec: _Spec, rank: int, world: int, worker: int, workers: int) -> None:
        self.spec, self.rank, self.world = spec, rank, world
        p = np.arange(spec.partitions)
        self.slots = p[p % (world * workers) == worker * world + rank]
        self.held: dict[tuple[int, int], _Held] = {}
        self.peak_bytes = self.peak_shards = 0

    def windows(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Local windows q [k] (all of this reader's, increasing) -> ([k, L + 1] token ids,
        [k, L + 1] loss masks or None)."""
        spec, window = self.spec, self.spec.seq_len + 1
        i = q * self.world + self.rank
        e, shard, m = spec.locate(i)
        rows = np.empty((len(q), window), spec.manifest.np_dtype)
        masks = np.empty((len(q), window), np.uint8) if spec.manifest.loss_mask else None
        key = e * spec.n + shard
        by_key = np.argsort(key, kind="stable")  # the windows grouped by (epoch, shard)
        starts = np.flatnonzero(np.diff(key[by_key])) + 1
        for sel in np.split(by_key, starts):
            k = int(key[sel[0]])
            held = self._get(k // spec.n, k % spec.n)
            idx = held.order[m[sel]]  # rows of the shard's [N, L + 1] view
            rows[sel] = held.rows[idx]
            if masks is not None:
                masks[sel] = held.masks[idx]  # type: ignore[index]
        nxt = int(i[-1]) + 1
        for gone in [k2 for k2, h in self.held.items() if h.last < nxt]:
            del self.held[gone]
        return rows, masks

    def _get(self, e: int, s: int) -> _Held:
        if (e, s) in self.held:
            return self.held[(e, s)]
        spec, window = self.spec, self.spec.seq_len + 1
        docs = read_shard(
            spec.manifest, spec.shards[s], allow_pipe=spec.allow_pipe, check_sha256=spec.hash_reads
        )
        order = doc_order(spec.seed, e, s, len(docs))
        dtype = spec.manifest.np_dtype
        flat = np.concatenate([docs[i][0] for i in order]) if docs else np.zeros(0, dtype)
        nwin = len(flat) // window
        assert nwin == spec.nwin[s], "read_shard checked the token count"
        masks = None
        if spec.manifest.loss_mask:
            parts = [docs[i][1] for i in order]
            mflat = np.concatenate(
                [np.ones(len(docs[i][0]), np.uint8) if mk is None else mk for i, mk in zip(order, parts)]
            ) if docs else np.zeros(0, np.uint8)  # fmt: skip
            masks = mflat[: nwin * window].reshape(nwin, window)
        held = _Held(
            flat[: nwin * window].reshape(nwin, window),
            masks,
            window_order(spec.seed, e, s, nwin),
            spec.last_use(e, s, self.slots),
        )
        self.held[(e, s)] = held
        size = sum(h.nbytes for h in self.held.values())
        self.peak_bytes = max(self.peak_bytes, size)
        self.peak_shards = max(self.peak_shards, len(self.held))
        return held


def _worker_windows(
    reader: _Reader, worker: int, workers: int, start: int, stop: int | None, first: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """(worker, rows [k, L + 1], masks or None) chunks of worker `worker`'s local windows
    q >= start with q mod workers == worker (and q < stop). Chunks start at `first` windows
    (a first batch comes fast) and double up to one window per slot of the reader: within a
    chunk no slot moves on to another shard, which keeps the memory bound."""
    q = start + (worker - start) % workers
    chunk, most = max(1, min(first, len(reader.slots))), max(1, len(reader.slots))
    while stop is None or q < stop:
        end = q + chunk * workers if stop is None else min(q + chunk * workers, stop)
        qs = np.arange(q, end, workers, dtype=np.int64)
        rows, masks = reader.windows(qs)
        yield worker, rows, masks
        q += len(qs) * workers
        chunk = min(2 * chunk, most)


@dataclass
class _WorkerFailure:
    """An exception raised in a DataLoader worker, passed to the main process as an item."""

    worker: int
    error: BaseException
    trace: str


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
    """One rank's DataLoader workers: worker w yields the chunks of local windows q ≡ w (mod W).
    An exception is yielded as a _WorkerFailure (then the worker stops), so that the main
    process raises it as itself, not wrapped in torch's worker traceback."""

    def __init__(
        self,
        spec: _Spec,
        rank: int,
        world: int,
        workers: int,
        start: int,
        stop: int | None,
        chunk: int,
    ) -> None:
        self.args = (spec, rank, world, workers, start, stop, chunk)

    def __iter__(self) -> Iterator[Any]:
        spec, rank, world, workers, start, stop, chunk = self.args
        info = get_worker_info()
        w = info.id if info is not None else 0
        try:
            reader = _Reader(spec, rank, world, w, workers)
            yield from _worker_windows(reader, w, workers, start, stop, chunk)
        except Exception as exc:  # noqa: BLE001 - passed on to the main process, see above
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an exception that cannot travel: its text can
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            yield _WorkerFailure(w, exc, traceback.format_exc())


def _keep(item: Any) -> Any:
    return item


def _raise_failure(f: _WorkerFailure, rank: int) -> None:
    if isinstance(f.error, DataError):
        raise f.error  # the message says what is wrong and what to do: nothing else to add
    err = RuntimeError(
        f"DataLoader worker {f.worker} of rank {rank} failed: {type(f.error).__name__}: {f.error}"
    )
    err.add_note("worker traceback:\n" + f.trace)
    raise err


class TokenLoader:
    """Packed (x, y) batches of a prepared split for one rank; see the module docstring.

    partitions: P, fixed for a run (`data.partitions`); None = as many as the split has
    windows, up to DEFAULT_PARTITIONS (for passes whose order need not match another world
    size's, such as validation)."""

    def __init__(
        self,
        data: str | Path | Manifest,
        split: str,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        loop: bool = True,
        partitions: int | None = DEFAULT_PARTITIONS,
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
        # A Manifest already read (the training run reads it once), or the data dir to read.
        if isinstance(data, Manifest):
            self._manifest = data
        else:
            self._manifest = read_manifest(data, allow_pipe=allow_pipe)
        data_dir = self._manifest.source
        if expected_tokenizer_sha256 is not None:
            check_tokenizer(self._manifest, expected_tokenizer_sha256)
        shards = self._manifest.shards(split)
        if is_local(data_dir):
            check_local_shards(self._manifest, split, verify_sha256=verify_sha256)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.loop = seed, loop
        self._W = max(1, num_workers)
        readers = world_size * self._W
        windows = sum(s.tokens // (seq_len + 1) for s in shards)
        if partitions is None:
            partitions = max(readers, min(DEFAULT_PARTITIONS, windows) // readers * readers)
        if partitions < 1 or partitions % readers:
            raise DataError(
                f"data.partitions={partitions} is not a multiple of world_size {world_size} x "
                f"num_workers {self._W} = {readers}: every rank and worker reads an equal share "
                f"of the partitions. Use a number of workers (or ranks) whose product divides "
                f"{partitions}, or, for a new run, set data.partitions to a multiple of {readers}."
            )
        if windows < partitions:
            raise DataError(
                f"split {split!r} of {data_dir} packs into {windows} windows of seq_len + 1 = "
                f"{seq_len + 1} tokens per epoch, fewer than data.partitions={partitions}: use "
                f"fewer partitions (a multiple of world_size x num_workers = {readers}), a "
                f"smaller seq_len, or more data."
            )
        self._spec = _Spec(self._manifest, split, seed, seq_len, partitions, allow_pipe)
        if self._spec.per_epoch // world_size < batch_size:
            raise DataError(
                f"split {split!r} of {data_dir} gives each of {world_size} ranks only "
                f"{self._spec.per_epoch // world_size} windows of seq_len + 1 = {seq_len + 1} "
                f"tokens per epoch, fewer than batch_size {batch_size}: use a smaller seq_len or "
                f"batch_size, or more data."
            )
        self._position = 0  # local windows yielded

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        manifest: Manifest,
        split: str,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        expected_tokenizer_sha256: str | None = None,
    ) -> TokenLoader:
        """The training run's loader of `split`: `data.*` decides the order (seed, partitions),
        the readers (num_workers) and the checks; the run supplies the batch geometry and this
        process's place in the world."""
        return cls(
            manifest, split, seq_len, batch_size, rank=rank, world_size=world_size,
            num_workers=cfg.num_workers, seed=cfg.seed, partitions=cfg.partitions,
            allow_pipe=cfg.allow_pipe, verify_sha256=cfg.verify_sha256,
            expected_tokenizer_sha256=expected_tokenizer_sha256,
        )  # fmt: skip

    # ---- facts

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def partitions(self) -> int:
        return self._spec.partitions

    @property
    def windows_per_epoch(self) -> int:
        """Windows of seq_len + 1 tokens read in one epoch of the split, over all ranks."""
        return self._spec.per_epoch

    @property
    def epoch(self) -> int:
        """The epoch of the next window this rank reads."""
        return self._position * self.world_size // self._spec.per_epoch

    def first_shards(self, count: int = 1, rank: int | None = None) -> list[str]:
        """Names of the first `count` distinct shards that rank `rank` (default: this loader's)
        reads in epoch 0, in the order it first reads them (all its workers together), with this
        loader's world size, seq_len, partitions and seed. Other ranks may read them too."""
        r = self.rank if rank is None else rank
        spec, q = self._spec, 0
        found: list[str] = []
        limit = spec.per_epoch // self.world_size
        while len(found) < count and q < limit:
            qs = np.arange(q, min(q + 4096, limit), dtype=np.int64)
            _, shard, _ = spec.locate(qs * self.world_size + r)
            for s in dict.fromkeys(shard.tolist()):
                name = spec.shards[s].name
                if name not in found:
                    found.append(name)
            q += len(qs)
        return found[:count]

    def memory_bound_bytes(self) -> int:
        """The docstring's bound on the bytes of shards one reader (worker) of this loader holds."""
        spec = self._spec
        per_reader = -(-spec.partitions // (self.world_size * self._W))
        item = spec.manifest.np_dtype.itemsize + (1 if spec.manifest.loss_mask else 0)
        biggest = max(s.tokens for s in spec.shards) * item + 8 * int(spec.nwin.max())
        return min(spec.n, 2 * per_reader + 1) * biggest

    # ---- iteration

    def _epoch_end(self, q: int) -> int:
        """The local position where the epoch of local window q ends."""
        e = q * self.world_size // self._spec.per_epoch
        return (e + 1) * self._spec.per_epoch // self.world_size

    def __iter__(self) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """Yields (x, y), both int64 [batch_size, seq_len], y = x shifted by one token (windows
        of seq_len + 1 tokens; y = -1 where the loss must ignore the target). loop=True: epochs
        forever (each reshuffled); loop=False: from the current position to the end of its
        epoch, then stop."""
        B, W, L = self.batch_size, self._W, self.seq_len
        start = self._position
        stop = None if self.loop else self._epoch_end(start)
        source: Any
        if self.num_workers == 0:
            reader = _Reader(self._spec, self.rank, self.world_size, 0, 1)
            self._reader = reader  # for benchmarks: peak_bytes, peak_shards
            source = _worker_windows(reader, 0, 1, start, stop, B)
        else:
            dataset = _RankDataset(self._spec, self.rank, self.world_size, W, start, stop, B)
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
        # Per worker: chunks of its windows not yet in a batch, and how far into the first.
        pending: list[deque[tuple[np.ndarray, np.ndarray | None]]] = [deque() for _ in range(W)]
        offset = [0] * W
        have = [0] * W

        def take(w: int, k: int) -> tuple[np.ndarray, np.ndarray | None]:
            """The next k windows of worker w (fetching chunks as needed)."""
            while have[w] < k:
                item = next(source)
                if isinstance(item, _WorkerFailure):
                    _raise_failure(item, self.rank)
                src, rows, masks = item
                pending[src].append((rows, masks))
                have[src] += len(rows)
            parts, mparts = [], []
            while k:
                rows, masks = pending[w][0]
                n = min(k, len(rows) - offset[w])
                parts.append(rows[offset[w] : offset[w] + n])
                mparts.append(None if masks is None else masks[offset[w] : offset[w] + n])
                offset[w] += n
                have[w] -= n
                k -= n
                if offset[w] == len(rows):
                    pending[w].popleft()
                    offset[w] = 0
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if mparts[0] is None:
                return rows, None
            return rows, mparts[0] if len(mparts) == 1 else np.concatenate(mparts)  # type: ignore[arg-type]

        try:
            q = start
            while stop is None or q + B <= stop:
                # Local windows q .. q + B - 1; window q + j comes from worker (q + j) mod W.
                if W == 1:
                    batch, mask = take(0, B)
                else:
                    batch = np.empty((B, L + 1), self._manifest.np_dtype)
                    mask = np.empty((B, L + 1), np.uint8) if self._manifest.loss_mask else None
                    for w in range(W):
                        first = (w - q) % W
                        k = len(range(first, B, W))
                        if k:
                            rows, masks = take(w, k)
                            batch[first::W] = rows
                            if mask is not None and masks is not None:
                                mask[first::W] = masks
                # One int64 copy each for x and y, contiguous: [B, L].
                x = torch.from_numpy(batch[:, :-1].astype(np.int64))
                y_np = batch[:, 1:].astype(np.int64)
                if mask is not None:
                    y_np[mask[:, 1:] == 0] = -1  # prompt tokens are no target of the loss
                q += B
                self._position = q  # bookkeeping of what was *yielded*
                yield x, torch.from_numpy(y_np)
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            if self.num_workers == 0:
                reader.held.clear()  # a pass cut short (validation's) keeps no shard loaded
        if stop is not None:
            self._position = stop  # the pass is over: its partial batch is dropped

    # ---- state

    def rewind(self) -> None:
        """Go back to the first window of the stream (epoch 0), e.g. to read the same
        validation batches at every evaluation."""
        self._position = 0

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-serialisable; the position right after the last batch this rank yielded."""
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "dataset": self._manifest.fingerprint(self.split),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "partitions": self._spec.partitions,
            "rank": self.rank,
            "world_size": self.world_size,
            "position": self._position,
            "global_position": self._position * self.world_size,
            "epoch": self.epoch,
        }

    def load_state_dict(self, states: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Takes the states of ALL ranks of the saving run (any world size, workers, batch
        size): this rank continues the saving run's global stream where it stopped (see State in
        the module docstring)."""
        if isinstance(states, dict):
            states = [states]
        if not states:
            raise ValueError("load_state_dict needs the loader states of all ranks; got none.")
        for st in states:
            fmt = st.get("format")
            if fmt != STATE_FORMAT and str(fmt).startswith("pretrain.TokenLoader/"):
                raise DataError(
                    f"the checkpoint's data-loader state has format {fmt!r}, this version reads "
                    f"{STATE_FORMAT!r}: the data order changed (one global stream over "
                    f"data.partitions, the same at any world size), so that position means "
                    f"nothing here. Resume with the version that saved it, or start a new run "
                    f"(another run.dir) from its weights."
                )
            if fmt != STATE_FORMAT:
                raise DataError(f"not a TokenLoader state (format {fmt!r}).")
            for key, mine in (
                ("split", self.split),
                ("dataset", self._manifest.fingerprint(self.split)),
                ("seed", self.seed),
                ("partitions", self._spec.partitions),
            ):
                if st[key] != mine:
                    flag = {"seed": "data.seed", "partitions": "data.partitions"}.get(key, key)
                    raise DataError(
                        f"the loader state was saved with {flag}={st[key]!r}, this loader has "
                        f"{flag}={mine!r}: resume with the same data, split, data.seed and "
                        f"data.partitions (or start a new run)."
                    )
            for key in ("world_size", "seq_len", "global_position"):
                if st[key] != states[0][key]:
                    raise DataError(
                        f"the loader states disagree on {key} ({st[key]} vs {states[0][key]}): "
                        f"they are not one checkpoint's."
                    )
        first = states[0]
        old_world = int(first["world_size"])
        ranks = sorted(int(st["rank"]) for st in states)
        if ranks != list(range(old_world)):
            raise DataError(
                f"load_state_dict needs the states of all {old_world} ranks of the saving run, "
                f"got ranks {ranks}."
            )
        g = int(first["global_position"])
        if int(first["seq_len"]) != self.seq_len:
            # Other windows: go on at the next epoch's start (nothing is read twice).
            old = _Spec(
                self._manifest,
                self.split,
                self.seed,
                int(first["seq_len"]),
                self._spec.partitions,
                False,
            )
            epoch = -(-g // old.per_epoch)
            g = epoch * self._spec.per_epoch
        if g % self.world_size:
            raise DataError(
                f"the checkpoint's data position ({g} windows over all ranks) is not divisible "
                f"by world_size {self.world_size}: it was not saved at an optimizer step whose "
                f"global batch this world size divides; resume with a world size that divides "
                f"{g}."
            )
        self._position = g // self.world_size

    def __repr__(self) -> str:
        return (
            f"TokenLoader({self._manifest.source!r}, split={self.split!r}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
            f"workers={self.num_workers}, partitions={self._spec.partitions}, epoch={self.epoch})"
        )
