"""Streams: one prepared source's global stream of windows, and the reader of a (rank, worker).

A source's global stream: a pure function of (seed, its manifest's split, seq_len L, P)
    Windows. Epoch e visits the split's n shards in the order `shard_order(seed, e, n)`. Shard
    s's stream in epoch e is its documents in `doc_order(seed, e, s, docs)`, concatenated, cut
    into N_s = tokens_s // (L + 1) non-overlapping windows w of L + 1 tokens (x = w[:-1],
    y = w[1:]); its last tokens_s mod (L + 1) tokens are in no window. The epoch's *layout*
    lists all windows shard by shard in shard order, each shard's in `window_order(seed, e, s,
    N_s)`: N = sum of N_s windows (the same every epoch).
    Partitions. The layout is cut into P ranges of T = N // P consecutive windows; the last
    N mod P (< P) windows of the layout are in none and skipped this epoch. Slot p < P reads
    range `range_order(seed, e, P)[p]` in layout order.
    The stream interleaves the slots window by window: the source's window n belongs to epoch
    e = n // (P·T) and is slot (n mod P)'s window number (n mod P·T) // P. Epochs follow on.
    So consecutive windows come from different, randomly placed ranges of the epoch, and a
    batch mixes windows from all over the split (whose documents `prepare` shuffled over its
    shards) instead of one shard's text. With one source, the loader's stream is this one; a
    mixture (`pretrain.data.mixture`) decides which source's next window of a slot comes where.

Reading (`SourceReader`): a (rank, worker) reads only its own slots of every source. It loads a
    shard when one of its slots first needs it in an epoch and keeps it while one of its slots
    that is in that epoch will still read it: each held shard knows, per slot of the reader
    that reads it in that epoch, the last window it reads there, and is dropped once every such
    slot has passed it. Per slot that is one shard being read and at most one waiting (the one
    straddling the end of its range, which the slot of the next range has loaded): at most
    2s shards for s slots. A mixture's slots read a source at equal rates on average, not in
    lock step, so they may drift into different epochs of a small source; a shard of a later
    epoch that a slot still behind will read is kept only while there is room under
    2s + 1 with s more loads to come (else it is read again when that slot gets there), so a
    reader never holds more than 2s + 1 shards of a source, and a small source whose epochs
    the slots straddle is not read over and over. Every shard read is sha256-checked
    (`read_shard`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pretrain.data.format import Manifest
from pretrain.data.mixture import Mixture
from pretrain.data.shards import read_shard


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


def epoch_windows(manifest: Manifest, split: str, seq_len: int) -> int:
    """N: the windows of seq_len + 1 tokens that one epoch of the split's shards packs into."""
    return sum(s.tokens // (seq_len + 1) for s in manifest.shards(split))


@dataclass
class SourceStream:
    """The global stream of one source's split (picklable: DataLoader workers get a copy)."""

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
        """Windows i [k] of the stream -> (epoch [k], shard [k], index in the shard's window
        order [k])."""
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

    def last_uses(self, e: int, shard: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of `slots` [s] read `shard` in epoch e, and the last window of the stream each
        reads it at: (indices into `slots` [u], windows [u])."""
        P, T = self.partitions, self.T
        _, starts, ends, pos_of, ranges = self.plan(e)
        a, b = starts[pos_of[shard]], ends[pos_of[shard]]
        r0 = ranges[slots] * T
        lo, hi = np.maximum(a, r0), np.minimum(b, r0 + T)
        used = np.flatnonzero(lo < hi)
        return used, e * P * T + (hi[used] - 1 - r0[used]) * P + slots[used]


@dataclass
class HeldShard:
    """A loaded shard of one epoch: its windows [N, L + 1] (a view of its stream), their loss
    masks or None, the order they are laid out in [N], and for the reader's slots that read it
    in that epoch (indices into the reader's slots [u]) the last window each reads it at [u]."""

    epoch: int
    rows: np.ndarray
    masks: np.ndarray | None
    order: np.ndarray
    users: np.ndarray
    last: np.ndarray

    @property
    def nbytes(self) -> int:
        return (
            self.rows.nbytes + self.order.nbytes + (0 if self.masks is None else self.masks.nbytes)
        )


class SourceReader:
    """Reads one source's windows for one (rank, worker), whose slots are `slots` [s]; see
    Reading in the module docstring."""

    def __init__(self, stream: SourceStream, slots: np.ndarray) -> None:
        self.stream, self.slots = stream, slots
        self.held: dict[tuple[int, int], HeldShard] = {}
        self.limit = 2 * len(slots) + 1  # shards held at most (module docstring)
        self.peak_bytes = self.peak_shards = self.loads = 0

    def windows(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Windows n [k] of the stream (all in this reader's slots) -> ([k, L + 1] token ids,
        [k, L + 1] loss masks or None)."""
        stream, window = self.stream, self.stream.seq_len + 1
        e, shard, m = stream.locate(n)
        rows = np.empty((len(n), window), stream.manifest.np_dtype)
        masks = np.empty((len(n), window), np.uint8) if stream.manifest.loss_mask else None
        key = e * stream.n + shard
        by_key = np.argsort(key, kind="stable")  # the windows grouped by (epoch, shard)
        starts = np.flatnonzero(np.diff(key[by_key])) + 1
        for sel in np.split(by_key, starts):
            k = int(key[sel[0]])
            held = self._get(k // stream.n, k % stream.n)
            idx = held.order[m[sel]]  # rows of the shard's [N, L + 1] view
            rows[sel] = held.rows[idx]
            if masks is not None:
                masks[sel] = held.masks[idx]  # type: ignore[index]
        return rows, masks

    def drop(self, nxt: np.ndarray) -> None:
        """Drop what no slot will read again, or not soon: nxt [s] is each slot's next window
        of the stream (see Reading in the module docstring)."""
        per_epoch = self.stream.per_epoch
        now, later = [], []
        for key, h in self.held.items():
            at = nxt[h.users]
            if ((at <= h.last) & (at >= h.epoch * per_epoch)).any():
                now.append(key)  # a slot in its epoch has yet to pass it
            elif (at < h.epoch * per_epoch).any():
                later.append(key)  # a slot still in an earlier epoch will read it
        room = max(0, self.limit - len(now) - len(self.slots))  # s more loads may come
        keep = set(now) | set(sorted(later)[:room])  # the nearest epochs first
        for key in [k for k in self.held if k not in keep]:
            del self.held[key]

    def _get(self, e: int, s: int) -> HeldShard:
        if (e, s) in self.held:
            return self.held[(e, s)]
        stream, window = self.stream, self.stream.seq_len + 1
        self.loads += 1
        docs = read_shard(
            stream.manifest,
            stream.shards[s],
            allow_pipe=stream.allow_pipe,
            check_sha256=stream.hash_reads,
        )
        order = doc_order(stream.seed, e, s, len(docs))
        dtype = stream.manifest.np_dtype
        flat = np.concatenate([docs[i][0] for i in order]) if docs else np.zeros(0, dtype)
        nwin = len(flat) // window
        assert nwin == stream.nwin[s], "read_shard checked the token count"
        masks = None
        if stream.manifest.loss_mask:
            parts = [docs[i][1] for i in order]
            mflat = np.concatenate(
                [np.ones(len(docs[i][0]), np.uint8) if mk is None else mk for i, mk in zip(order, parts)]
            ) if docs else np.zeros(0, np.uint8)  # fmt: skip
            masks = mflat[: nwin * window].reshape(nwin, window)
        users, last = stream.last_uses(e, s, self.slots)
        held = HeldShard(
            e,
            flat[: nwin * window].reshape(nwin, window),
            masks,
            window_order(stream.seed, e, s, nwin),
            users,
            last,
        )
        self.held[(e, s)] = held
        size = sum(h.nbytes for h in self.held.values())
        self.peak_bytes = max(self.peak_bytes, size)
        self.peak_shards = max(self.peak_shards, len(self.held))
        return held


class Reader:
    """Reads the windows of one (rank, worker) of a loader: positions q·R + r of the mixed stream
    for its local windows q, from its slots of every source (`streams`, one per source of the
    mixture; None for a source that no longer reads)."""

    def __init__(
        self,
        mixture: Mixture,
        streams: list[SourceStream | None],
        rank: int,
        world: int,
        worker: int,
        workers: int,
    ) -> None:
        self.mixture, self.rank, self.world = mixture, rank, world
        p = np.arange(mixture.partitions, dtype=np.int64)
        self.slots = p[p % (world * workers) == worker * world + rank]
        self.sources = [None if s is None else SourceReader(s, self.slots) for s in streams]
        live = [s for s in streams if s is not None]
        self.dtype = live[0].manifest.np_dtype
        self.masked = any(s.manifest.loss_mask for s in live)
        self.peak_bytes = self.peak_shards = 0

    def windows(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Local windows q [k] (all of this reader's, increasing) -> ([k, L + 1] token ids,
        [k, L + 1] loss masks (all ones for a source without them) or None)."""
        i = q * self.world + self.rank
        k, n = self.mixture.take(i)
        if len(self.sources) == 1:
            rows, masks = self._source(0).windows(n)
        else:
            window = next(s for s in self.sources if s is not None).stream.seq_len + 1
            rows = np.empty((len(q), window), self.dtype)
            masks = np.ones((len(q), window), np.uint8) if self.masked else None
            for src in np.unique(k).tolist():
                sel = np.flatnonzero(k == src)
                rows[sel], m = self._source(src).windows(n[sel])
                if m is not None:
                    masks[sel] = m  # type: ignore[index]
        held = [h for s in self.sources if s is not None for h in s.held.values()]
        self.peak_bytes = max(self.peak_bytes, sum(h.nbytes for h in held))
        self.peak_shards = max(self.peak_shards, len(held))
        nxt = self.mixture.next_windows(self.slots, int(i[-1]) + 1)  # [s, K]
        for src, reader in enumerate(self.sources):
            if reader is not None:
                reader.drop(nxt[:, src])
        return rows, masks

    @property
    def held(self) -> int:
        """Shards of all sources loaded now."""
        return sum(len(s.held) for s in self.sources if s is not None)

    def _source(self, k: int) -> SourceReader:
        reader = self.sources[k]
        assert reader is not None, "a source without weight from the reader's position is read"
        return reader

    def clear(self) -> None:
        for reader in self.sources:
            if reader is not None:
                reader.held.clear()
