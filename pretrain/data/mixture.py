"""Mixtures: which source each position of the mixed stream reads (no I/O).

Sources. A mixture reads K prepared sources (`Source`: a name, a manifest, a weight), each with
    its own global stream (`pretrain.data.stream`: a pure function of the seed, its manifest,
    seq_len and P = data.partitions). The mixture never changes a source's own order; it
    decides, for each position of the mixed stream, which source's next window comes there.

The blend. The weights are normalised and rounded to integers a_k >= 1 summing to the period
    D (largest remainder; a source with a positive weight never rounds to 0). The blend table
    G [D] is Megatron's error-minimising interleave of one period: at t = 0 .. D - 1 it takes
    the source with the largest deficit a_k·(t + 1) - D·c_k(t) (ties to the lower index), c_k(t)
    being source k's count in G[:t]. So each source has exactly a_k of every D consecutive
    positions and, over any span of consecutive positions, differs from a_k / D × its length
    by less than 2 for the weights we use (measured: 1 for 2 sources, 1.33 for 0.5/0.3/0.2 and
    0.9/0.05/0.05, 1.75 for 8 equal weights). That is not a theorem: 8 sources of which several
    weigh under 0.1% reach 2.2.
    D = 65,537, a prime (65,539 when P is a multiple of it): so P and D are coprime, and slot
    p's positions p, p + P, p + 2P, ... run through every entry of G once per D rows. Each slot
    therefore reads every source at exactly its share, a_k per D rows, whatever the weights
    (with a period that P divides, a slot would see only every P-th entry of G, which for 1:1
    weights and an even P is a single source: the other half of each source would never be
    read). Over fewer rows a slot's share can stray (`Mixture.drift`): by up to about
    D / (2P) windows where P × a weight is whole (1:1 and an even P), ~32 at P = 1024; the
    slots of a source then drift that far apart, which reading (`pretrain.data.stream`) and
    its memory bound allow for. Building the tables takes 50-100 ms for 8 sources.

The mixed stream. Global position i (i = 0, 1, ...) lies in slot p = i mod P, row j = i // P
    (as with one source) and takes the next window of source k = G[i mod D] in slot p: the
    n-th window of source k that slot p takes is source k's window n·P + p, i.e. slot p reads
    source k's windows of slot p in source k's own order, and a source that runs out of
    windows in a slot starts its next epoch there (its own reshuffle), independently of the
    other sources and slots. Slot p's row j reads G[(j·P + p) mod D] = Q[(o_p + j) mod D], with
    Q[t] = G[t·P mod D] and o_p = p·P⁻¹ mod D: every slot's blend sequence is Q from its own
    offset. So c_k(p, j), the count of k in slot p's rows j' < j, is F_k(o_p + j) - F_k(o_p),
    F_k(t) = (t // D)·a_k + (count of k in Q[:t mod D]), from one prefix table [D + 1, K]: O(1)
    for any j, vectorised over positions. With one source of weight 1, c(p, j) = j and position
    i reads the source's window i: the mixed stream is the source's stream, bit for bit.

Phases. A mixture is a list of phases (start position g0, integer weights, seq_len), g0 = 0 for
    the first; a resumed run with other weights or sources starts a new one at its position.
    For positions i >= g0 the phase's own table applies (indexed by i mod D, absolute) and
    each source goes on where it was: c_k(p, j) = base_k(p) + (count of k in slot p's rows
    [j0(p), j) under the phase's table), j0(p) the first row of slot p at or after g0 and
    base_k(p) the count at j0(p) under the earlier phases. A source with zero weight in a
    phase keeps its place; a source new in a phase starts at 0. Nothing is read twice or
    skipped in any source. A phase with another seq_len (whose windows are other windows)
    starts every source, in every slot, at its next epoch: base = ⌈c / T_old⌉·T_new.

Progress. Windows of source k read by the whole run up to global position g are
    sum over p of c_k(p, rows of slot p before g): O(P·K) from the tables, no scan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.data.format import DataError, Manifest


@dataclass(frozen=True)
class Source:
    """One prepared data dir of a mixture: `weight` is its share (normalised over the mixture)."""

    name: str
    manifest: Manifest
    weight: float


def describe(source: Source) -> str:
    """How messages name a source: its name and data dir (the data dir alone when unnamed)."""
    return (
        f"source {source.name!r} ({source.manifest.source})"
        if source.name
        else source.manifest.source
    )


def check_sources(sources: Sequence[Source], split: str) -> list[Source]:
    """The sources of a mixture, refused with what to do unless: named apart, weights > 0, each
    has `split`, one tokenizer, no data twice."""
    if not sources or not all(isinstance(s, Source) for s in sources):
        raise DataError(f"a mixture is a non-empty sequence of Source; got {sources!r}.")
    names = [s.name for s in sources]
    for s in sources:
        if names.count(s.name) > 1:
            raise DataError(
                f"the mixture names source {s.name!r} twice: give each a name of its own."
            )
        if not (isinstance(s.weight, (int, float)) and math.isfinite(s.weight) and s.weight > 0):
            raise DataError(
                f"source {s.name!r} has weight {s.weight!r}: a weight is a number > 0 (leave "
                f"the source out to not read it)."
            )
        if not s.manifest.has(split):
            have = sorted(x for x in s.manifest.splits if s.manifest.has(x))
            raise DataError(
                f"{describe(s)} has no split {split!r} (it has {have}): "
                f"every source of a mixture needs it; re-run prepare for it, or leave it out."
            )
    for s in sources[1:]:
        a, b = sources[0].manifest, s.manifest
        if a.tokenizer_sha256 != b.tokenizer_sha256:
            raise DataError(
                f"sources {sources[0].name!r} (tokenizer {a.tokenizer_sha256[:12]}) and "
                f"{s.name!r} (tokenizer {b.tokenizer_sha256[:12]}) were prepared with different "
                f"tokenizers: prepare every source with one tokenizer (`python -m "
                f"pretrain.prepare ... tokenizer.path={a.source}/{a.tokenizer}`)."
            )
    fps = [s.manifest.fingerprint(split) for s in sources]
    for s, fp in zip(sources, fps):
        if fps.count(fp) > 1:
            twin = next(o.name for o, f in zip(sources, fps) if f == fp and o is not s)
            raise DataError(
                f"sources {s.name!r} and {twin!r} are the same data ({split} fingerprint {fp}): "
                f"give it once, with the sum of their weights."
            )
    return list(sources)


@dataclass(frozen=True)
class Phase:
    """From global position `start` on: the integer weights (over the mixture's sources, sum
    D) and the seq_len whose windows are counted."""

    start: int
    weights: tuple[int, ...]
    seq_len: int

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "weights": list(self.weights), "seq_len": self.seq_len}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Phase:
        return cls(int(raw["start"]), tuple(int(w) for w in raw["weights"]), int(raw["seq_len"]))


def blend_period(partitions: int) -> int:
    """D: a prime of at least 2**16 that does not divide P (so that P and D are coprime)."""
    return 65_537 if partitions % 65_537 else 65_539


def integer_weights(weights: Sequence[float], total: int) -> tuple[int, ...]:
    """Weights (>= 0, some > 0) -> integers summing to `total`, by largest remainder (ties to
    the lower index); a positive weight never rounds to 0 (the unit comes from the largest)."""
    w = np.asarray(weights, np.float64)
    if not len(w) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0; got {list(weights)}.")
    q = w / w.sum() * total
    a = np.floor(q).astype(np.int64)
    order = sorted(range(len(w)), key=lambda k: (-(q[k] - a[k]), k))
    a[order[: total - int(a.sum())]] += 1
    for k in np.flatnonzero((w > 0) & (a == 0)).tolist():
        a[int(np.argmax(a))] -= 1  # argmax: the first of the largest
        a[k] = 1
    return tuple(int(x) for x in a)


def interleave(counts: Sequence[int]) -> np.ndarray:
    """G [D] uint8: Megatron's error-minimising interleave of one period (module docstring).

    A plain loop over D positions and the sources with a positive count, on Python ints (no
    numpy call per position): 30-70 ms for D = 65,537 and 2-8 sources."""
    a = [int(c) for c in counts]
    D = sum(a)
    live = [k for k, c in enumerate(a) if c > 0]
    if len(live) == 1:
        return np.full(D, live[0], np.uint8)
    al = [a[k] for k in live]
    c = [0] * len(live)
    out = bytearray(D)
    ks = range(len(live))
    for t in range(1, D + 1):
        best, top = 0, al[0] * t - D * c[0]  # the deficit a_k·(t + 1) - D·c_k at position t - 1
        for k in ks:
            v = al[k] * t - D * c[k]
            if v > top:  # strictly: ties stay with the lower index
                best, top = k, v
        out[t - 1] = live[best]
        c[best] += 1
    return np.frombuffer(bytes(out), np.uint8).copy()


@dataclass
class _Table:
    """One phase's tables: G [D], prefix F [D + 1, K] of Q, integer weights a [K], the first row
    j0 [P] of each slot in the phase, and off [P, K] = base_k(p) - F_k(o_p + j0(p))."""

    start: int
    G: np.ndarray
    F: np.ndarray
    a: np.ndarray
    j0: np.ndarray
    off: np.ndarray
    spread: np.ndarray  # [K] max - min over t of F_k(t) - a_k·t / D: how far a slot strays


class Mixture:
    """The sources' names, P, and the phases: which source and which of its windows each
    position reads, and the per-slot counts (see the module docstring). Picklable.

    slot_windows[(k, seq_len)] = T_k, source k's windows per slot per epoch at that seq_len:
    needed only where a phase changes seq_len (a source not in it keeps its count)."""

    def __init__(
        self,
        names: Sequence[str],
        phases: Sequence[Phase],
        partitions: int,
        slot_windows: Mapping[tuple[int, int], int] | None = None,
    ) -> None:
        if len(names) > 255:
            raise DataError(f"a mixture reads at most 255 sources; got {len(names)}.")
        if not phases or phases[0].start != 0:
            raise ValueError("a mixture's first phase starts at position 0.")
        self.names, self.phases = list(names), list(phases)
        self.partitions = P = partitions
        self.period = D = blend_period(P)
        self.offsets = np.arange(P, dtype=np.int64) * pow(P, -1, D) % D  # o_p [P]
        self.trivial = len(names) == 1 and len(phases) == 1
        self._tables: list[_Table] = []
        self._starts = np.array([ph.start for ph in phases], np.int64)
        built: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        p = np.arange(P, dtype=np.int64)
        for f, ph in enumerate(phases):
            if len(ph.weights) != len(names) or sum(ph.weights) != D or min(ph.weights) < 0:
                raise DataError(
                    f"phase {f} of the mixture has weights {list(ph.weights)}: not {len(names)} "
                    f"integers >= 0 summing to {D}."
                )
            if f and ph.start < phases[f - 1].start:
                raise DataError("the mixture's phases are not in order of their start.")
            if ph.weights not in built:
                G = interleave(ph.weights)
                Q = G[np.arange(D, dtype=np.int64) * P % D]
                F = np.zeros((D + 1, len(names)), np.int32)
                np.cumsum(Q[:, None] == np.arange(len(names)), axis=0, out=F[1:])
                E = F - np.arange(D + 1)[:, None] * np.array(ph.weights)[None, :] / D
                built[ph.weights] = (G, F, E.max(0) - E.min(0))
            G, F, spread = built[ph.weights]
            j0 = np.maximum(0, -(-(ph.start - p) // P))
            base = np.zeros((P, len(names)), np.int64) if f == 0 else self.counts(p, j0)
            if f and ph.seq_len != phases[f - 1].seq_len:
                for k in range(len(names)):
                    old = (slot_windows or {}).get((k, phases[f - 1].seq_len))
                    new = (slot_windows or {}).get((k, ph.seq_len))
                    if old and new:  # other windows: each slot starts its next epoch
                        base[:, k] = -(-base[:, k] // old) * new
            a = np.array(ph.weights, np.int64)
            table = _Table(ph.start, G, F, a, j0, np.zeros((P, len(names)), np.int64), spread)
            table.off = base - self._cumulative(table, self.offsets + j0)
            self._tables.append(table)

    def drift(self) -> np.ndarray | None:
        """[K]: at most how many windows of each source two slots of one reader are apart (their
        rows differ by at most 1): 2 for one source; each phase adds 2 × its spread + 1 (a slot
        strays from its share by at most the spread). None after a change of seq_len, whose
        jump to the next epoch can set slots an epoch apart."""
        if any(a.seq_len != b.seq_len for a, b in zip(self.phases, self.phases[1:])):
            return None
        return 1 + sum(np.ceil(2 * tb.spread).astype(np.int64) + 1 for tb in self._tables)

    @property
    def weights(self) -> tuple[int, ...]:
        """The integer weights of the last phase (what reads from now on)."""
        return self.phases[-1].weights

    def _cumulative(self, tb: _Table, t: np.ndarray) -> np.ndarray:
        """F(t) [n, K] for t [n] >= 0: the count of each source in Q[:t], Q repeated."""
        D = self.period
        return (t // D)[:, None] * tb.a[None, :] + tb.F[t % D]

    def take(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions i [n] -> (the source each reads [n], the window of that source's
        own stream it reads [n])."""
        if self.trivial:
            return np.zeros(len(i), np.int64), i.astype(np.int64, copy=True)
        P, D = self.partitions, self.period
        p, j = i % P, i // P
        f = np.searchsorted(self._starts, i, side="right") - 1
        k, n = np.empty_like(i), np.empty_like(i)
        for phase in np.unique(f).tolist():
            sel = np.flatnonzero(f == phase)
            tb, ps = self._tables[phase], p[sel]
            t = self.offsets[ps] + j[sel]
            ks = tb.G[i[sel] % D].astype(np.int64)
            k[sel] = ks
            n[sel] = tb.off[ps, ks] + (t // D) * tb.a[ks] + tb.F[t % D, ks]
        return k, n * P + p

    def counts(self, p: np.ndarray, j: np.ndarray) -> np.ndarray:
        """c [n, K]: windows of each source that slot p [n] read in its rows before j [n]."""
        out = np.zeros((len(p), len(self.names)), np.int64)
        for tb in self._tables:  # each (p, j) ends up counted by the last phase it is in
            sel = np.flatnonzero(j >= tb.j0[p])
            out[sel] = tb.off[p[sel]] + self._cumulative(tb, self.offsets[p[sel]] + j[sel])
        return out

    def rows_before(self, p: np.ndarray, g: int) -> np.ndarray:
        """The rows [n] of slots p [n] whose positions are before global position g."""
        return np.maximum(0, -(-(g - p) // self.partitions))

    def next_windows(self, slots: np.ndarray, g: int) -> np.ndarray:
        """[s, K]: the window of each source's stream that each of `slots` [s] reads next, its
        positions before g read."""
        c = self.counts(slots, self.rows_before(slots, g))
        return c * self.partitions + slots[:, None]

    def consumed(self, g: int) -> np.ndarray:
        """[K]: windows of each source read at global positions before g (all ranks)."""
        p = np.arange(self.partitions, dtype=np.int64)
        return self.counts(p, self.rows_before(p, g)).sum(0)


def resume_phases(
    saved: Sequence[tuple[str, str]],
    phases: Sequence[Phase],
    sources: Sequence[tuple[str, str]],
    weights: Sequence[int],
    position: int,
    seq_len: int,
) -> tuple[list[tuple[str, str]], list[Phase], str | None]:
    """A resumed mixture: the saved sources (name, dataset fingerprint) and phases, and this
    run's sources and integer weights, resuming at global position `position`.

    A source is the same source if its fingerprint is; one whose name is a saved source's but
    whose data is not is refused. Returns (all sources, saved ones first; the phases; a
    one-line description of the change of mixture, or None): the saved phases go on unchanged
    when the weights over those sources and the seq_len are the same, otherwise a new phase
    starts at `position` (see Phases in the module docstring)."""
    union = list(saved)
    fps = [fp for _, fp in union]
    where: list[int] = []
    for name, fp in sources:
        if fp in fps:
            where.append(fps.index(fp))
            union[where[-1]] = (name, fp)  # the name this run gives it
            continue
        for was_name, old_fp in saved:
            if was_name == name:
                what = (
                    f"the loader state was saved with dataset={old_fp!r}, this loader has "
                    f"dataset={fp!r}"
                    if name == ""
                    else f"source {name!r} holds other data than when the loader state was "
                    f"saved (dataset {old_fp!r}, now {fp!r})"
                )
                raise DataError(
                    f"{what}: resume with the same data, split, data.seed and data.partitions "
                    f"(or start a new run)."
                )
        union.append((name, fp))
        fps.append(fp)
        where.append(len(union) - 1)
    pad = len(union) - len(saved)
    old = [Phase(ph.start, tuple(ph.weights) + (0,) * pad, ph.seq_len) for ph in phases]
    new = [0] * len(union)
    for u, w in zip(where, weights):
        new[u] = int(w)
    if old[-1].start == position and len(old) > 1:
        old.pop()  # it read nothing: the phase before it is what was read up to `position`
    last = old[-1]
    if last.weights == tuple(new) and last.seq_len == seq_len:
        return union, old, None
    if last.start == position:
        old.pop()
    old.append(Phase(position, tuple(new), seq_len))
    if last.weights == tuple(new):
        return union, old, None  # only seq_len: every source starts its next epoch, as alone
    D = sum(new)
    parts = []
    for u, (name, _) in enumerate(union):
        was, now = last.weights[u] / D, new[u] / D
        tag = name or "(unnamed)"
        if u >= len(saved):
            parts.append(f"{tag} (new) {now:.3f}")
        elif was or now:
            parts.append(f"{tag} {was:.3f} -> {now:.3f}")
    message = (
        f"data mixture changed at window {position:,} of the run: {', '.join(parts)}; every "
        f"source goes on from where it stopped (a new source from its start)"
    )
    return union, old, message
