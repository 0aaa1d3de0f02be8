"""TokenLoader: packed (x, y) batches of a prepared split, or of a weighted mixture of several
prepared sources: one global order, any world size.

The global stream: a pure function of (seed, the sources' manifests, their weights, seq_len L,
partitions P)
    One source (a data dir or Manifest): its own global stream (`pretrain.data.stream`: every
    epoch reshuffles the shards, the documents and windows of each, and the P ranges of the
    epoch, which the P slots read interleaved window by window). Position i of the stream is
    the source's window i.
    Several (a sequence of `Source`): every source keeps its own global stream; global position
    i, in slot p = i mod P and row j = i // P, takes the next window of slot p of the source
    that the mixture's blend table gives that position (`pretrain.data.mixture`: each source
    gets exactly its share of every 65,537 consecutive positions, and differs from its share of
    any span by less than 2 windows for the usual weights). One source of weight 1 is the
    one-source loader, bit for bit.

The split: ranks and workers are a view on the stream
    Rank r of R reads global positions r, r + R, r + 2R, ...: its local window q is position
    q·R + r, and its batches are consecutive runs of batch_size local windows. So optimizer step
    k with gradient accumulation A reads local windows [k·B·A, (k + 1)·B·A) on every rank, i.e.
    positions [k·G, (k + 1)·G) with G = B·A·R: the same windows for any world size, micro
    batch and accumulation with the same global batch G (their order inside the step differs;
    the loss is a mean over the step). R must divide P; with W DataLoader workers R·W must
    divide P. Then local window q is read by worker q mod W, and the reader (r, w) only ever
    reads the P / (R·W) slots p with p mod (R·W) = w·R + r, of every source.

Memory: a reader loads a shard of a source when one of its slots first needs it in an epoch,
    and drops it once every one of its slots that reads it in that epoch is past it (see
    Reading in `pretrain.data.stream`). Per source, a slot reads one shard at a time, and at
    most one more can wait for it (the one straddling the end of its range, which the slot of
    the next range has already loaded). So per source k a reader holds at most
        c_k × (max_s tokens_s × (itemsize + m) + 8 × max_s N_s)
    bytes, c_k = min(2 × ⌈P / (R·W)⌉ + 1, n_k × (⌊(Δ_k + 1) / T_k⌋ + 2)) shards: n_k shards
    per epoch of the source, in as many epochs as its slots can straddle, Δ_k being how many
    windows of the source two slots of one reader can be apart (2 with one source, whose
    slots are in at most two epochs at once; a mixture's from its blend tables,
    `Mixture.drift`; after a change of seq_len the first term alone). itemsize is 2 (uint16
    ids) or 4, m = 1 when the data has loss masks (else 0), and 8 bytes per window are its read
    order; the reader's bound is the sum over its sources. Plus one shard's tar bytes while it
    loads, and prefetched batches. `memory_bound_bytes()` evaluates it. A smaller P lowers it
    (for a new run: P is part of the order).

Packing and what is dropped: per epoch of each source, each shard's tail (< L + 1 tokens) and
    N mod P < P windows; loop=False also drops each rank's final partial batch (< B windows).
    Every other window of a source's epoch is read exactly once, by exactly one rank (tested).

Epochs of a mixture: source k's epochs are its windows read over its windows per epoch
    (`source_epochs()`), each slot of it starting its next epoch when it has read its range. The
    loader's `windows_per_epoch` is the span of positions in which the source that its weight
    makes go round fastest reads one epoch of its own (min over k of N_k·D / a_k; with one
    source, N): `epoch` counts those, and loop=False reads to the end of the current one.

Fine-tuning data: when a source has loss masks, y = -1 where the target token is not a response
    token (prompt tokens), which the model's loss ignores; the windows of a mixture's other
    sources are all targets.

State: the position. A rank's position is the count q of local windows it has yielded
    (prefetched batches never count); the run's global position g = q·R is the same on every
    rank at a step boundary. `load_state_dict(all ranks' states)` sets q = g / R' for the new
    world size R' (any workers, micro batch and accumulation), so a resumed run, elastic or not,
    continues the uninterrupted run's global stream exactly. A mixture's state also names its
    sources (name and dataset fingerprint) and its phases (start position, integer weights,
    seq_len); a state of one source without phases is the one-source format, unchanged. With
    the same sources and weights the stream goes on exactly; with other weights, or sources
    added or dropped (matched by their data, whatever their names), a new phase starts at g:
    the new mixture applies from there and every source goes on from where it stopped (a new
    one from its start, a dropped one stops being read), and `phase_change` says so in a line.
    With another seq_len the windows are others: every source starts its next epoch (one
    source: the run jumps to the next epoch's start, nothing is read twice, the rest of the
    current epoch is skipped; a mixture: each slot of each source does so). Another data.seed,
    data.partitions, split, or a source whose name stays but whose data changed, is refused.
"""

from __future__ import annotations

import atexit
import hashlib
import pickle
import signal
import traceback
import weakref
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import DataConfig
from pretrain.data.format import DataError, Manifest
from pretrain.data.mixture import (
    Mixture,
    Phase,
    Source,
    blend_period,
    check_sources,
    describe,
    integer_weights,
    resume_phases,
)
from pretrain.data.shards import check_local_shards, check_tokenizer, is_local, read_manifest
from pretrain.data.stream import (
    Reader,
    SourceStream,
    doc_order,
    epoch_windows,
    range_order,
    shard_order,
    window_order,
)

# /3: one global stream over P partitions (/2 read whole shards per rank x worker slot). A
# mixture's state adds its sources and phases to the same keys.
STATE_FORMAT = "pretrain.TokenLoader/3"
# data.partitions' default: up to 1024 readers (128 GPUs x 8 workers, 256 x 4, ...).
DEFAULT_PARTITIONS = DataConfig.partitions

__all__ = [  # with the order's functions, which the tests rebuild the stream from
    "DEFAULT_PARTITIONS", "STATE_FORMAT", "Source", "TokenLoader",
    "doc_order", "range_order", "shard_order", "window_order",
]  # fmt: skip

Data = str | Path | Manifest | Source | Sequence[Source]
# What a rank's readers share: the mixture, each source's stream (None: no longer read), rank, R.
ReaderArgs = tuple[Mixture, list[SourceStream | None], int, int]


def _worker_windows(
    reader: Reader, worker: int, workers: int, start: int, stop: int | None, first: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """(worker, rows [k, L + 1], masks or None) chunks of worker `worker`'s local windows
    q >= start with q mod workers == worker (and q < stop). Chunks start at `first` windows
    (a first batch comes fast) and double up to one window per slot of the reader: within a
    chunk no slot moves on to another shard of any source, which keeps the memory bound."""
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group


class _RankDataset(IterableDataset):
    """One rank's DataLoader workers: worker w yields the chunks of local windows q ≡ w (mod W).
    An exception is yielded as a _WorkerFailure (then the worker stops), so that the main
    process raises it as itself, not wrapped in torch's worker traceback."""

    def __init__(
        self, rank_of: ReaderArgs, workers: int, start: int, stop: int | None, chunk: int
    ) -> None:
        self.args = (rank_of, workers, start, stop, chunk)

    def __iter__(self) -> Iterator[Any]:
        rank_of, workers, start, stop, chunk = self.args
        info = get_worker_info()
        w = info.id if info is not None else 0
        try:
            reader = Reader(*rank_of, w, workers)
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
    """Packed (x, y) batches of a prepared split, or of a mixture of sources, for one rank; see
    the module docstring.

    data: a data dir or a Manifest (one source, named ""), or a sequence of `Source` (a
    mixture; one Source is allowed). partitions: P, fixed for a run (`data.partitions`); None =
    as many as the smallest source's split has windows, up to DEFAULT_PARTITIONS (for passes
    whose order need not match another world size's, such as validation)."""

    def __init__(
        self,
        data: Data,
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
        self._sources = _sources(data, split, allow_pipe)
        first = self._sources[0].manifest
        if expected_tokenizer_sha256 is not None:
            check_tokenizer(first, expected_tokenizer_sha256)  # the sources share it
        for s in self._sources:
            if is_local(s.manifest.source):
                check_local_shards(s.manifest, split, verify_sha256=verify_sha256)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.loop, self.allow_pipe = seed, loop, allow_pipe
        self._W = max(1, num_workers)
        readers = world_size * self._W
        windows = [epoch_windows(s.manifest, split, seq_len) for s in self._sources]
        if partitions is None:
            partitions = max(readers, min(DEFAULT_PARTITIONS, min(windows)) // readers * readers)
        if partitions < 1 or partitions % readers:
            raise DataError(
                f"data.partitions={partitions} is not a multiple of world_size {world_size} x "
                f"num_workers {self._W} = {readers}: every rank and worker reads an equal share "
                f"of the partitions. Use a number of workers (or ranks) whose product divides "
                f"{partitions}, or, for a new run, set data.partitions to a multiple of {readers}."
            )
        for s, n in zip(self._sources, windows):
            if n < partitions:
                raise DataError(
                    f"split {split!r} of {describe(s)} packs into {n} windows of seq_len + 1 = "
                    f"{seq_len + 1} tokens per epoch, fewer than data.partitions={partitions}: "
                    f"use fewer partitions (a multiple of world_size x num_workers = "
                    f"{readers}), a smaller seq_len, or more data."
                )
        self._P = partitions
        self._streams = [
            SourceStream(s.manifest, split, seed, seq_len, partitions, allow_pipe)
            for s in self._sources
        ]
        self._spec = self._streams[0]  # the first source's stream
        self._fingerprints = [s.manifest.fingerprint(split) for s in self._sources]
        self._fresh()
        if self.windows_per_epoch // world_size < batch_size:
            raise DataError(
                f"split {split!r} of {describe(self._sources[0])} gives each of {world_size} "
                f"ranks only {self.windows_per_epoch // world_size} windows of seq_len + 1 = "
                f"{seq_len + 1} tokens per epoch, fewer than batch_size {batch_size}: use a "
                f"smaller seq_len or batch_size, or more data."
            )
        self._position = 0  # local windows yielded
        # Set by load_state_dict: a line saying how the mixture changed, or None.
        self.phase_change: str | None = None

    def _fresh(self) -> None:
        """This loader's own mixture from position 0 (no phases from a checkpoint)."""
        self._weights = integer_weights([s.weight for s in self._sources], blend_period(self._P))
        self._union = self._own()
        self._mixture = Mixture([n for n, _ in self._union], [Phase(0, self._weights, self.seq_len)], self._P)  # fmt: skip
        self._union_streams: list[SourceStream | None] = list(self._streams)

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        data: Manifest | Sequence[Source],
        split: str,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        expected_tokenizer_sha256: str | None = None,
    ) -> TokenLoader:
        """The training run's loader of `split` (of one Manifest, or of a mixture of sources):
        `data.*` decides the order (seed, partitions), the readers (num_workers) and the
        checks; the run supplies the batch geometry and this process's place in the world."""
        return cls(
            data, split, seq_len, batch_size, rank=rank, world_size=world_size,
            num_workers=cfg.num_workers, seed=cfg.seed, partitions=cfg.partitions,
            allow_pipe=cfg.allow_pipe, verify_sha256=cfg.verify_sha256,
            expected_tokenizer_sha256=expected_tokenizer_sha256,
        )  # fmt: skip

    # ---- facts

    @property
    def manifest(self) -> Manifest:
        """The first source's manifest (the only one's, for one source)."""
        return self._sources[0].manifest

    @property
    def sources(self) -> list[Source]:
        """This loader's sources (a data dir or Manifest: one Source named "", weight 1.0)."""
        return list(self._sources)

    @property
    def partitions(self) -> int:
        return self._P

    @property
    def windows_per_epoch(self) -> int:
        """Windows of seq_len + 1 tokens read in one epoch, over all ranks: of the split, for
        one source; for a mixture, see Epochs of a mixture in the module docstring."""
        D, a = self._mixture.period, self._mixture.weights
        return min(
            s.per_epoch * D // a[u]
            for u, s in enumerate(self._union_streams)
            if s is not None and a[u]
        )

    @property
    def epoch(self) -> int:
        """The epoch of the next window this rank reads (for a mixture: in `windows_per_epoch`)."""
        return self._position * self.world_size // self.windows_per_epoch

    def consumed(self) -> dict[str, int]:
        """Windows of each source read by the whole run (all ranks) before this loader's
        position (the next epoch's start, for windows skipped by a change of seq_len)."""
        c = self._mixture.consumed(self._position * self.world_size)
        return {name: int(c[self._union.index((name, fp))]) for name, fp in self._own()}

    def source_epochs(self) -> dict[str, float]:
        """Epochs of each source read by the whole run: windows read / windows per epoch."""
        per = {s.name: st.per_epoch for s, st in zip(self._sources, self._streams)}
        return {name: n / per[name] for name, n in self.consumed().items()}

    def first_shards(self, count: int = 1, rank: int | None = None) -> list[str]:
        """Names of the first `count` distinct shards that rank `rank` (default: this loader's)
        reads in epoch 0, in the order it first reads them (all its workers together), with this
        loader's world size, seq_len, partitions and seed ("<source name>:<shard>" for a
        mixture of several). Other ranks may read them too."""
        r = self.rank if rank is None else rank
        mixed, q = len(self._sources) > 1, 0
        mixture, streams = self._mixture, self._union_streams
        if len(mixture.phases) > 1:  # epoch 0 of this loader's own mixture, not the history's
            mixture = Mixture([s.name for s in self._sources], [Phase(0, self._weights, self.seq_len)], self._P)  # fmt: skip
            streams = list(self._streams)
        found: dict[str, None] = {}
        limit = self.windows_per_epoch // self.world_size
        while len(found) < count and q < limit:
            qs = np.arange(q, min(q + 4096, limit), dtype=np.int64)
            k, n = mixture.take(qs * self.world_size + r)
            shard = np.empty_like(n)
            for u in np.unique(k).tolist():
                stream = streams[u]
                assert stream is not None, "a phase read by no source of the loader"
                shard[k == u] = stream.locate(n[k == u])[1]
            for u, s in dict.fromkeys(zip(k.tolist(), shard.tolist())):
                name = streams[u].shards[s].name  # type: ignore[union-attr]
                found[f"{mixture.names[u]}:{name}" if mixed else name] = None
            q += len(qs)
        return list(found)[:count]

    def memory_bound_bytes(self) -> int:
        """The docstring's bound on the bytes of shards one reader (worker) of this loader holds."""
        per_reader = -(-self._P // (self.world_size * self._W))
        drift = self._mixture.drift()
        total = 0
        for u, s in enumerate(self._union_streams):
            if s is None:
                continue
            item = s.manifest.np_dtype.itemsize + (1 if s.manifest.loss_mask else 0)
            biggest = max(sh.tokens for sh in s.shards) * item + 8 * int(s.nwin.max())
            held = 2 * per_reader + 1
            if drift is not None:  # the epochs its slots can be in at once
                held = min(held, s.n * (int(drift[u] + 1) // s.T + 2))
            total += held * biggest
        return total

    def _own(self) -> list[tuple[str, str]]:
        """(name, dataset fingerprint) of this loader's sources."""
        return [(s.name, fp) for s, fp in zip(self._sources, self._fingerprints)]

    # ---- iteration

    def _epoch_end(self, q: int) -> int:
        """The local position where the epoch of local window q ends."""
        per = self.windows_per_epoch
        return (q * self.world_size // per + 1) * per // self.world_size

    def __iter__(self) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """Yields (x, y), both int64 [batch_size, seq_len], y = x shifted by one token (windows
        of seq_len + 1 tokens; y = -1 where the loss must ignore the target). loop=True: epochs
        forever (each reshuffled); loop=False: from the current position to the end of its
        epoch, then stop."""
        B, W, L = self.batch_size, self._W, self.seq_len
        start = self._position
        stop = None if self.loop else self._epoch_end(start)
        dtype = self.manifest.np_dtype
        masked = any(s.manifest.loss_mask for s in self._sources)
        args: ReaderArgs = (self._mixture, self._union_streams, self.rank, self.world_size)
        source: Any
        if self.num_workers == 0:
            reader = Reader(*args, 0, 1)
            self._reader = reader  # for benchmarks: peak_bytes, peak_shards
            source = _worker_windows(reader, 0, 1, start, stop, B)
        else:
            dataset = _RankDataset(args, W, start, stop, B)
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
                    batch = np.empty((B, L + 1), dtype)
                    mask = np.empty((B, L + 1), np.uint8) if masked else None
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
                reader.clear()  # a pass cut short (validation's) keeps no shard loaded
        if stop is not None:
            self._position = stop  # the pass is over: its partial batch is dropped

    # ---- state

    def rewind(self) -> None:
        """Go back to the first window of the stream (epoch 0), e.g. to read the same
        validation batches at every evaluation; a mixture forgets the phases of a checkpoint
        and reads its own weights from the start."""
        self._position = 0
        if len(self._mixture.phases) > 1 or self._union != self._own():
            self._fresh()

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-serialisable; the position right after the last batch this rank yielded."""
        mixed = not self._mixture.trivial
        state = {
            "format": STATE_FORMAT,
            "split": self.split,
            "dataset": _fingerprint(self._union) if mixed else self._union[0][1],
            "seed": self.seed,
            "seq_len": self.seq_len,
            "partitions": self._P,
            "rank": self.rank,
            "world_size": self.world_size,
            "position": self._position,
            "global_position": self._position * self.world_size,
            "epoch": self.epoch,
        }
        if mixed:
            state["blend_period"] = self._mixture.period
            state["sources"] = [{"name": n, "dataset": fp} for n, fp in self._union]
            state["phases"] = [ph.to_json() for ph in self._mixture.phases]
        return state

    def load_state_dict(self, states: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Takes the states of ALL ranks of the saving run (any world size, workers, batch
        size): this rank continues the saving run's global stream where it stopped, in a new
        phase if the mixture changed (see State in the module docstring)."""
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
            for key, mine in (("split", self.split), ("seed", self.seed), ("partitions", self._P)):
                if st[key] != mine:
                    flag = {"seed": "data.seed", "partitions": "data.partitions"}.get(key, key)
                    raise DataError(
                        f"the loader state was saved with {flag}={st[key]!r}, this loader has "
                        f"{flag}={mine!r}: resume with the same data, split, data.seed and "
                        f"data.partitions (or start a new run)."
                    )
            for key in ("world_size", "seq_len", "global_position", "sources", "phases"):
                if st.get(key) != states[0].get(key):
                    raise DataError(
                        f"the loader states disagree on {key} ({st.get(key)} vs "
                        f"{states[0].get(key)}): they are not one checkpoint's."
                    )
        first = states[0]
        old_world = int(first["world_size"])
        ranks = sorted(int(st["rank"]) for st in states)
        if ranks != list(range(old_world)):
            raise DataError(
                f"load_state_dict needs the states of all {old_world} ranks of the saving run, "
                f"got ranks {ranks}."
            )
        g, old_len = int(first["global_position"]), int(first["seq_len"])
        D = blend_period(self._P)
        if first.get("blend_period", D) != D:
            raise DataError(f"the loader state's blend period {first['blend_period']} is not {D}.")
        saved = [(s["name"], s["dataset"]) for s in first.get("sources", [])]
        saved = saved or [("", first["dataset"])]
        phases = [Phase.from_json(ph) for ph in first.get("phases", [])]
        phases = phases or [Phase(0, (D,), old_len)]
        self._fresh()
        self.phase_change = None
        if (
            len(saved) == len(phases) == len(self._sources) == 1
            and saved[0][1] == self._union[0][1]
        ):
            # One source, as it always was: today's rules (another seq_len: the next epoch).
            if old_len != self.seq_len:
                old = SourceStream(self.manifest, self.split, self.seed, old_len, self._P, False)
                g = -(-g // old.per_epoch) * self._spec.per_epoch
        else:
            union, phases, self.phase_change = resume_phases(
                saved, phases, self._own(), self._weights, g, self.seq_len
            )
            self._union = union
            own = dict(zip(self._own(), self._streams))
            self._union_streams = [own.get(src) for src in union]
            lens = {ph.seq_len for ph in phases}
            slot_windows = {
                (u, n): epoch_windows(s.manifest, self.split, n) // self._P
                for u, s in enumerate(self._union_streams)
                if s is not None
                for n in lens
            }
            self._mixture = Mixture([n for n, _ in union], phases, self._P, slot_windows)
        if g % self.world_size:
            raise DataError(
                f"the checkpoint's data position ({g} windows over all ranks) is not divisible "
                f"by world_size {self.world_size}: it was not saved at an optimizer step whose "
                f"global batch this world size divides; resume with a world size that divides "
                f"{g}."
            )
        self._position = g // self.world_size

    def __repr__(self) -> str:
        names = ", ".join(repr(s.name) for s in self._sources)
        data = repr(self.manifest.source) if len(self._sources) == 1 else f"sources=[{names}]"
        return (
            f"TokenLoader({data}, split={self.split!r}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
            f"workers={self.num_workers}, partitions={self._P}, epoch={self.epoch})"
        )


def _fingerprint(union: Sequence[tuple[str, str]]) -> str:
    """The dataset of a mixture's state: its sources' names and data, in order."""
    h = hashlib.sha256()
    for name, fp in union:
        h.update(f"{name}\0{fp}\n".encode())
    return h.hexdigest()[:16]


def _sources(data: Data, split: str, allow_pipe: bool) -> list[Source]:
    """The loader's sources: a data dir or Manifest is one source named ""."""
    if isinstance(data, (str, Path, Manifest)):
        manifest = (
            data if isinstance(data, Manifest) else read_manifest(data, allow_pipe=allow_pipe)
        )
        manifest.shards(split)  # names the split and what the data dir has
        return [Source("", manifest, 1.0)]
    return check_sources([data] if isinstance(data, Source) else list(data), split)
