"""Mixtures of prepared sources in one process: the blend's shares over every span, one source is
the plain loader bit for bit, the same windows at any world size, exact and elastic resume,
phase changes that neither repeat nor skip a window of any source, per-source epochs, the
refusals, the memory bound and the progress counters."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.config import DataConfig
from pretrain.data import DataError, Source, TokenLoader, read_manifest
from pretrain.data.mixture import Mixture, Phase, blend_period, integer_weights, interleave
from tests.data_fixtures import as_windows, epoch_windows, global_stream

# 24 partitions: 1, 2, 4 ranks x 1, 2, 3 workers divide it.
L, B, P, SEED = 32, 4, 24, 3


def _mix(dirs: dict[str, tuple[Path, float]], **kw: Any) -> TokenLoader:
    args: dict[str, Any] = dict(seq_len=L, batch_size=B, partitions=P, seed=SEED) | kw
    sources = [Source(name, read_manifest(d), w) for name, (d, w) in dirs.items()]
    return TokenLoader(sources, "train", args.pop("seq_len"), args.pop("batch_size"), **args)


def _take(loader: TokenLoader, n: int | None = None) -> np.ndarray:
    return np.concatenate([as_windows(x, y) for x, y in itertools.islice(loader, n)])


def _interleave(per_rank: list[np.ndarray]) -> np.ndarray:
    """The global stream from each rank's local windows: position q·R + r is rank r's q-th."""
    n = min(len(p) for p in per_rank)
    return np.stack([p[:n] for p in per_rank], axis=1).reshape(-1, *per_rank[0].shape[1:])


def _stream(data: Path, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """A source's own global stream over `epochs` epochs, from the tar files (data_fixtures):
    (windows [n, L + 1], shard of each [n])."""
    parts = [global_stream(data, "train", SEED, e, L, P) for e in range(epochs)]
    return np.concatenate([w for w, _ in parts]), np.concatenate([s for _, s in parts])


def _spread(counts: np.ndarray, share: float) -> float:
    """max - min over t of counts[t] - share·t: the largest deviation of any span's count from
    its share (a span [s, t) deviates by E(t) - E(s))."""
    e = counts - share * np.arange(len(counts))
    return float(e.max() - e.min())


def _decode(mixed: np.ndarray, streams: list[np.ndarray]) -> np.ndarray:
    """The source [n] of each window of a mixed stream read from position 0, from the
    documented rule alone: slot p's windows of a source are that source's own windows p,
    P + p, 2P + p, ... in order, so each window is the next slot-p window of exactly one
    source (asserted)."""
    nxt = np.zeros((len(streams), P), np.int64)
    out = np.empty(len(mixed), np.int64)
    for i, w in enumerate(mixed):
        p = i % P
        hits = [k for k, s in enumerate(streams) if np.array_equal(s[nxt[k, p] * P + p], w)]
        assert len(hits) == 1, (i, hits)
        out[i] = hits[0]
        nxt[hits[0], p] += 1
    return out


# ---- the blend


@pytest.mark.parametrize(
    "weights",
    [[1, 1], [0.7, 0.3], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [1] * 8, list(range(1, 9))],
)
def test_the_blend_gives_each_source_its_share_of_every_span(weights: list[float]) -> None:
    D = blend_period(1024)
    a = integer_weights(weights, D)
    assert sum(a) == D and min(a) >= 1
    assert all(abs(ak - w / sum(weights) * D) < 1 for ak, w in zip(a, weights))
    G = interleave(a)
    for k, ak in enumerate(a):
        c = np.concatenate([[0], np.cumsum(np.tile(G, 2) == k)])  # two periods: spans that wrap
        assert c[D] == ak  # exactly a_k of every D positions
        assert _spread(c, ak / D) < 2, (k, _spread(c, ak / D))
    # Every slot reads every source at exactly its share (a_k per D rows), for any P: a period
    # that P divided would give each slot a single source for 1:1 weights and an even P.
    for parts in (24, 1024):
        mix = Mixture(["s"] * len(a), [Phase(0, a, L)], parts)
        p = np.arange(parts)
        for r in (1, 3):
            assert (mix.counts(p, np.full(parts, r * D)) == r * np.array(a)).all()


def test_a_tiny_weight_still_reaches_every_slot() -> None:
    a = integer_weights([1, 1e-7], blend_period(24))
    assert a[1] == 1  # never rounded away
    mix = Mixture(["big", "tiny"], [Phase(0, a, L)], 24)
    assert (mix.counts(np.arange(24), np.full(24, blend_period(24)))[:, 1] == 1).all()


def test_loader_shares_over_every_span(tiny_data: Path, code_data: Path) -> None:
    loader = _mix({"web": (tiny_data, 0.7), "code": (code_data, 0.3)})
    got = _take(loader, 1500)  # 6,000 windows
    is_code = _decode(got, [_stream(tiny_data, 1)[0], _stream(code_data, 3)[0]])
    share = integer_weights([0.7, 0.3], blend_period(P))[1] / blend_period(P)
    # Every span of the stream (and so every step's batch) holds its share, to under 2 windows.
    assert _spread(np.concatenate([[0], np.cumsum(is_code)]), share) < 2
    assert _spread(np.concatenate([[0], np.cumsum(is_code)]), 0.3) < 2


# ---- one source, world sizes, resume


def test_one_source_mixture_is_the_plain_loader_bit_for_bit(tiny_data: Path) -> None:
    m = read_manifest(tiny_data)
    plain = TokenLoader(tiny_data, "train", L, B, partitions=P, seed=SEED, num_workers=2)
    one = TokenLoader([Source("web", m, 1.0)], "train", L, B, partitions=P, seed=SEED)
    a, b = _take(plain, 60), _take(one, 60)
    assert np.array_equal(a, b)
    assert np.array_equal(a, global_stream(tiny_data, "train", SEED, 0, L, P)[0][: len(a)])
    s1, s2 = plain.state_dict(), one.state_dict()
    assert s1 == s2  # today's state format: the same keys, the same values
    assert one.sources == [Source("web", m, 1.0)] and plain.sources == [Source("", m, 1.0)]
    # Either resumes the other's state, exactly.
    again = TokenLoader([Source("web", m, 1.0)], "train", L, B, partitions=P, seed=SEED)
    again.load_state_dict([s1])
    assert again.phase_change is None
    plain.load_state_dict([s2])
    assert np.array_equal(_take(again, 20), _take(plain, 20))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_same_windows_per_step_at_any_world_size_workers_and_batch(
    tiny_data: Path, code_data: Path
) -> None:
    dirs = {"web": (tiny_data, 0.6), "code": (code_data, 0.4)}
    G = 24  # the global batch of a step
    ref = _take(_mix(dirs, batch_size=G), 8)
    for world, workers, micro in [(1, 2, 8), (2, 1, 4), (2, 0, 12), (4, 2, 3), (4, 0, 6)]:
        per_rank = [
            _take(
                _mix(dirs, rank=r, world_size=world, num_workers=workers, batch_size=micro),
                8 * G // world // micro,
            )  # fmt: skip
            for r in range(world)
        ]
        got = _interleave(per_rank)
        assert np.array_equal(got, ref), (world, workers, micro)
        # ... so step k (any accumulation: G / (world x micro) micro-batches) holds the same
        # windows as one rank's step k.
        for k in range(8):
            step = np.concatenate([p[k * G // world : (k + 1) * G // world] for p in per_rank])
            assert Counter(map(bytes, step)) == Counter(map(bytes, ref[k * G : (k + 1) * G]))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_exact_and_elastic_resume_of_a_mixture(tiny_data: Path, code_data: Path) -> None:
    dirs = {"web": (tiny_data, 0.5), "code": (code_data, 0.5)}
    ref = _take(_mix(dirs), 140)
    two = [_mix(dirs, rank=r, world_size=2, num_workers=2) for r in range(2)]
    head = _interleave([_take(ld, 30) for ld in two])
    states = json.loads(json.dumps([ld.state_dict() for ld in two]))  # as a checkpoint has them
    assert np.array_equal(head, ref[: len(head)])
    exact = [_mix(dirs, rank=r, world_size=2, num_workers=2) for r in range(2)]
    for ld in exact:
        ld.load_state_dict(states)
        assert ld.phase_change is None
    tail = _interleave([_take(ld, 10) for ld in exact])
    assert np.array_equal(tail, ref[len(head) : len(head) + len(tail)])
    one = _mix(dirs, num_workers=3, batch_size=6)  # 2 ranks -> 1, other workers and batch
    one.load_state_dict(states)
    tail1 = _take(one, 20)
    assert np.array_equal(tail1, ref[len(head) : len(head) + len(tail1)])


# ---- phases


def _read(loader: TokenLoader, batches: int) -> list[tuple[str, int, bytes]]:
    """(source, window of its own stream, bytes) of each window the loader yields, the source
    and index as the mixture places them (their content is checked against the sources' own
    streams by the caller)."""
    q = loader.state_dict()["position"]
    got = _take(loader, batches)
    k, n = loader._mixture.take((q + np.arange(len(got))) * loader.world_size + loader.rank)
    names = loader._mixture.names
    return [(names[s], int(i), w.tobytes()) for s, i, w in zip(k.tolist(), n.tolist(), got)]


def test_phase_changes_neither_repeat_nor_skip_any_window(tiny_data: Path, code_data: Path) -> None:
    web, code = (tiny_data, 0.7), (code_data, 0.3)
    a = _mix({"web": web, "code": code})
    seen = _read(a, 50)
    # Other weights, and from 1 rank to 2.
    b = [_mix({"web": (tiny_data, 0.2), "code": (code_data, 0.8)}, rank=r, world_size=2) for r in range(2)]  # fmt: skip
    for ld in b:
        ld.load_state_dict([a.state_dict()])
    assert b[0].phase_change == (
        "data mixture changed at window 200 of the run: web 0.700 -> 0.200, code 0.300 -> "
        "0.800; every source goes on from where it stopped (a new source from its start)"
    )
    parts = [_read(ld, 40) for ld in b]
    seen += [w for pair in zip(*parts) for w in pair]  # position order: rank 0, rank 1, ...
    # web dropped (and back to 1 rank), then back; the same weights again continue exactly.
    c = _mix({"code": (code_data, 1.0)})
    c.load_state_dict([ld.state_dict() for ld in b])
    assert "web 0.200 -> 0.000, code 0.800 -> 1.000" in (c.phase_change or "")
    seen += _read(c, 60)
    d = _mix({"web": (tiny_data, 1.0), "code": (code_data, 1.0)})
    d.load_state_dict([c.state_dict()])
    assert "web 0.000 -> 0.500, code 1.000 -> 0.500" in (d.phase_change or "")
    seen += _read(d, 30)
    state = d.state_dict()
    assert [ph["start"] for ph in state["phases"]] == [0, 200, 520, 760]
    e = _mix({"web": (tiny_data, 1.0), "code": (code_data, 1.0)})
    e.load_state_dict([state])
    assert e.phase_change is None
    d_more = _read(d, 30)
    assert _read(e, 30) == d_more  # exact resume inside the fourth phase
    seen += d_more

    # From the sources' own streams alone: each window read is the next window of its slot of
    # exactly one source, so no source repeated or skipped one, across the four phases.
    decoded = _decode(np.array([np.frombuffer(w, "<u2") for _, _, w in seen]), [_stream(tiny_data, 1)[0], _stream(code_data, 2)[0]])  # fmt: skip
    assert [("web", "code")[k] for k in decoded] == [s for s, _, _ in seen]
    # And the place the mixture gives each window is that window of its source's stream.
    for name, data in (("web", tiny_data), ("code", code_data)):
        windows, shard = _stream(data, 2)  # shard [n]: the shard each window is from
        mine = [(i, w) for s, i, w in seen if s == name]
        idx = np.array([i for i, _ in mine])
        assert all(windows[i].tobytes() == w for i, w in mine)
        # Per slot, the source's windows n·P + p for n = 0, 1, 2, ... with no gap: nothing
        # read twice, nothing skipped, across the four phases.
        for p in range(P):
            n = np.sort(idx[idx % P == p]) // P
            assert np.array_equal(n, np.arange(len(n))), (name, p)
        # ... so each shard gives each of its windows at most once an epoch.
        reads = Counter((i // (len(windows) // 2), int(shard[i])) for i in idx)
        nwin = {i: s.tokens // (L + 1) for i, s in enumerate(read_manifest(data).shards("train"))}
        assert all(n <= nwin[s] for (_, s), n in reads.items())
    assert len(seen) == 1000 and d.consumed() == Counter(s for s, _, _ in seen)


def test_a_new_source_starts_at_its_beginning_and_a_changed_one_is_refused(
    tiny_data: Path, code_data: Path, sft_data: Path
) -> None:
    # A one-source run (today's state) becomes a mixture: web goes on, code starts at 0.
    plain = TokenLoader(tiny_data, "train", L, B, partitions=P, seed=SEED)
    head = _take(plain, 25)
    mix = _mix({"code": (code_data, 0.5), "web": (tiny_data, 0.5)})
    mix.load_state_dict([plain.state_dict()])
    assert "run: web 1.000 -> 0.500, code (new) 0.500;" in (mix.phase_change or "")
    seen = _read(mix, 25)
    assert all(_stream(tiny_data, 1)[0][i].tobytes() == w for s, i, w in seen if s == "web")
    assert all(_stream(code_data, 1)[0][i].tobytes() == w for s, i, w in seen if s == "code")
    # Per slot, web goes on from where the one-source run stopped and code from its start.
    for name, before in (("web", list(range(len(head)))), ("code", [])):
        idx = np.array(before + [i for s, i, _ in seen if s == name])
        for p in range(P):
            n = np.sort(idx[idx % P == p]) // P
            assert np.array_equal(n, np.arange(len(n))), (name, p)
    # A source whose name stays but whose data is other data is refused, by name.
    m = read_manifest(code_data)
    state = mix.state_dict()
    other = TokenLoader([Source("code", read_manifest(sft_data), 0.5), Source("", m, 0.5)],
                        "train", L, B, partitions=P, seed=SEED)  # fmt: skip
    with pytest.raises(DataError, match=r"source 'code' holds other data than when the loader "):
        other.load_state_dict([state])
    # Another seed is refused for a mixture as for one source.
    with pytest.raises(DataError, match="data.seed=3, this loader has data.seed=4"):
        _mix({"code": (code_data, 0.5), "web": (tiny_data, 0.5)}, seed=4).load_state_dict([state])


def test_another_seq_len_starts_every_source_at_its_next_epoch(
    tiny_data: Path, code_data: Path
) -> None:
    dirs = {"web": (tiny_data, 0.5), "code": (code_data, 0.5)}
    a = _mix(dirs)
    first = _read(a, 200)  # 800 windows: every slot inside its first epoch of each source
    b = _mix(dirs, seq_len=48)
    b.load_state_dict([a.state_dict()])
    assert b.phase_change is None  # the mixture is the same; the windows are others
    then = _read(b, 24)
    for name, (data, _) in dirs.items():
        old_T = len(_stream(data, 1)[0]) // P
        stream = np.concatenate([global_stream(data, "train", SEED, e, 48, P)[0] for e in (0, 1)])
        new_T = len(stream) // 2 // P
        assert all(stream[i].tobytes() == w for s, i, w in then if s == name)
        # Slot p, having read c windows of the source, starts at the window of its next epoch
        # (the first, if it read none): ⌈c / T_old⌉·T_new, and goes on from there.
        for p in range(P):
            c = sum(1 for s, i, _ in first if s == name and i % P == p)
            n = np.sort([i // P for s, i, _ in then if s == name and i % P == p])
            start = -(-c // old_T) * new_T
            assert np.array_equal(n, start + np.arange(len(n))), (name, p)
        base = sum(
            -(-sum(1 for s, i, _ in first if s == name and i % P == p) // old_T) for p in range(P)
        )
        assert b.source_epochs()[name] == pytest.approx(
            (base * new_T + sum(s == name for s, _, _ in then)) / (P * new_T)
        )


# ---- epochs, refusals, memory, progress


def test_a_small_source_runs_several_epochs_each_reshuffled(tiny_data: Path, code_data: Path):
    dirs = {"web": (tiny_data, 0.3), "code": (code_data, 0.7)}
    loader = _mix(dirs)
    seen = _read(loader, 3000)  # 12,000 windows: ~3 epochs of code, ~0.2 of web
    epochs = loader.source_epochs()
    assert 2.9 < epochs["code"] < 3 and 0.15 < epochs["web"] < 0.25
    windows, _ = _stream(code_data, 3)
    per_epoch = len(windows) // 3
    for e in (0, 1):  # epochs every slot finished: each window of the epoch exactly once
        got = Counter(w for s, i, w in seen if s == "code" and i // per_epoch == e)
        assert got == epoch_windows(code_data, "train", SEED, e, L, P)
    first = [w for s, i, w in seen if s == "code" and i < per_epoch]
    second = [w for s, i, w in seen if s == "code" and per_epoch <= i < 2 * per_epoch]
    assert first != second and sorted(first) != sorted(second)  # reshuffled and repacked
    # The loader's epochs are those of the source that goes round fastest (code here).
    assert (
        loader.windows_per_epoch
        == per_epoch * blend_period(P) // integer_weights([0.3, 0.7], blend_period(P))[1]
    )
    assert loader.epoch == 12_000 // loader.windows_per_epoch == 2
    once = _mix(dirs, loop=False)
    assert len(_take(once)) == loader.windows_per_epoch // B * B and once.epoch == 1
    assert once.source_epochs()["code"] == pytest.approx(1, abs=0.01)


def test_mixtures_are_refused_with_what_to_do(
    tiny_data: Path, code_data: Path, other_tokenizer_data: Path
) -> None:
    web, code = read_manifest(tiny_data), read_manifest(code_data)
    other = read_manifest(other_tokenizer_data)
    with pytest.raises(
        DataError,
        match=rf"sources 'web' \(tokenizer {web.tokenizer_sha256[:12]}\) and 'other' \(tokenizer "
        rf"{other.tokenizer_sha256[:12]}\) were prepared with different tokenizers",
    ):
        TokenLoader([Source("web", web, 1), Source("other", other, 1)], "train", L, B)
    no_val = dataclasses.replace(code, splits={"train": code.splits["train"]})
    with pytest.raises(DataError, match=rf"source 'code' \({code_data}\) has no split 'val'"):
        TokenLoader([Source("web", web, 1), Source("code", no_val, 1)], "val", L, B)
    for w in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DataError, match=r"source 'code' has weight .*a weight is a number > 0"):
            TokenLoader([Source("web", web, 1), Source("code", code, w)], "train", L, B)
    with pytest.raises(DataError, match="names source 'web' twice"):
        TokenLoader([Source("web", web, 1), Source("web", code, 1)], "train", L, B)
    with pytest.raises(DataError, match="sources 'a' and 'b' are the same data"):
        TokenLoader([Source("a", web, 1), Source("b", web, 1)], "train", L, B)
    with pytest.raises(DataError, match=r"split 'train' of source 'code' \(.*\) packs into"):
        TokenLoader([Source("web", web, 1), Source("code", code, 1)], "train", L, B,
                    partitions=1 << 14)  # fmt: skip


def test_a_reader_holds_at_most_the_bound_of_each_source(
    tiny_data: Path, code_data: Path, sft_data: Path
) -> None:
    dirs = {"web": (tiny_data, 0.5), "code": (code_data, 0.3), "sft": (sft_data, 0.2)}
    for world, parts in ((1, 24), (4, 24), (1, 4), (2, 8)):
        loader = _mix(dirs, world_size=world, partitions=parts)
        batches = 3000 // world
        for _ in itertools.islice(loader, batches):
            pass
        reader, mix = loader._reader, loader._mixture
        drift = mix.drift()
        assert drift is not None
        # How far apart the reader's slots were in each source, at every row it read: within
        # the drift the bound assumes.
        rows = range(0, batches * B * world // parts, 5)
        gaps = np.max([np.ptp(mix.counts(reader.slots, np.full(len(reader.slots), j)), axis=0) for j in rows], axis=0)  # fmt: skip
        assert (gaps <= drift).all(), (gaps, drift)
        for u, src in enumerate(reader.sources):
            assert src is not None
            cap = min(
                2 * len(reader.slots) + 1, src.stream.n * ((int(drift[u]) + 1) // src.stream.T + 2)
            )
            assert src.peak_shards <= cap, (world, parts, u)
        assert reader.peak_bytes <= loader.memory_bound_bytes()
    assert max(s.peak_shards for s in reader.sources if s is not None) > 2  # the bound binds


def test_progress_equals_what_was_yielded(tiny_data: Path, code_data: Path) -> None:
    streams = [_stream(tiny_data, 1)[0], _stream(code_data, 3)[0]]
    dirs = {"web": (tiny_data, 0.6), "code": (code_data, 0.4)}
    two = [_mix(dirs, rank=r, world_size=2) for r in range(2)]
    mixed = _interleave([_take(ld, 150) for ld in two])
    count = Counter(["web", "code"][k] for k in _decode(mixed, streams))
    for ld in two:  # each rank knows the whole run's counts
        assert ld.consumed() == dict(count)
    per_epoch = {
        name: sum(epoch_windows(data, "train", SEED, 0, L, P).values())
        for name, (data, _) in dirs.items()
    }
    assert two[0].source_epochs() == {k: count[k] / per_epoch[k] for k in dirs}
    # Across a phase change too.
    c = _mix({"web": (tiny_data, 0.1), "code": (code_data, 0.9)})
    c.load_state_dict([ld.state_dict() for ld in two])
    mixed = np.concatenate([mixed, _take(c, 100)])
    count = Counter(["web", "code"][k] for k in _decode(mixed, streams))
    assert c.consumed() == dict(count)


def test_first_shards_name_the_source_in_a_mixture(tiny_data: Path, code_data: Path) -> None:
    loader = _mix({"web": (tiny_data, 0.5), "code": (code_data, 0.5)})
    names = loader.first_shards(6)
    assert len(names) == 6 and {n.split(":")[0] for n in names} == {"web", "code"}
    shards = {f"web:{s.name}" for s in read_manifest(tiny_data).shards("train")}
    shards |= {f"code:{s.name}" for s in read_manifest(code_data).shards("train")}
    assert set(names) <= shards


def test_from_config_rewind_and_a_small_state(tiny_data: Path, code_data: Path) -> None:
    sources = [Source("web", read_manifest(tiny_data), 0.5), Source("code", read_manifest(code_data), 0.5)]  # fmt: skip
    cfg = DataConfig(num_workers=0, seed=SEED, partitions=P)
    loader = TokenLoader.from_config(cfg, sources, "train", L, B)
    assert loader.sources == sources
    fresh = _take(_mix({"web": (tiny_data, 0.5), "code": (code_data, 0.5)}), 10)
    assert np.array_equal(_take(loader, 10), fresh)
    other = _mix({"web": (tiny_data, 0.9), "code": (code_data, 0.1)})
    other.load_state_dict([loader.state_dict()])
    state = other.state_dict()
    assert len(json.dumps(state)) < 1000 and len(state["phases"]) == 2
    # rewind: the loader's own mixture from its first window, the checkpoint's phases forgotten.
    other.rewind()
    assert other.state_dict()["position"] == 0 and "phases" in other.state_dict()
    assert np.array_equal(_take(other, 10), _take(_mix({"web": (tiny_data, 0.9), "code": (code_data, 0.1)}), 10))  # fmt: skip


def test_a_mixture_preset_composes_and_its_keys_are_typed() -> None:
    from hydra import compose, initialize_config_dir

    from pretrain.config import ConfigError, validate
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["data=mix-example", "data.mix.code.weight=0.5"])  # fmt: skip
        assert {n: (s.dir, s.weight) for n, s in cfg.data.mix.items()} == {
            "web": ("data/web", 0.7), "code": ("data/code", 0.5),
        }  # fmt: skip
        assert isinstance(cfg.data.mix.code._get_node("weight")._value(), float)
        validate(cfg)
        for override, says in (
            ("data.mix.code.weight=-1", "data.mix.code.weight=-1.0 must be positive"),
            ("data.mix.code.dir=''", "data.mix.code.dir is empty"),
        ):
            with pytest.raises(ConfigError, match=says):
                validate(compose(config_name="config", overrides=["data=mix-example", override]))
