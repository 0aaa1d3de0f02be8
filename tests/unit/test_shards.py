"""Shards and the loader in one process: URLs (local, http, pipe), integrity errors, packing and
window order, exact and elastic resume bookkeeping."""

from __future__ import annotations

import functools
import http.server
import itertools
import random
import shutil
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pretrain.data import DataError, ShardError, TokenLoader, read_manifest
from pretrain.data.loader import STATE_FORMAT, _Cursor, plan_elastic, shard_order
from tests.data_fixtures import as_windows, epoch_windows, unit_stream, unit_windows

L, B = 32, 4


def _take(loader: TokenLoader, n: int | None = None) -> list[np.ndarray]:
    return [as_windows(x, y) for x, y in itertools.islice(loader, n)]


@pytest.fixture
def data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_pass_yields_each_window_once_and_drops_only_the_documented_tails(
    tiny_data: Path, num_workers: int
):
    loader = TokenLoader(tiny_data, "train", L, B, num_workers=num_workers, loop=False, seed=3)
    batches = _take(loader)
    x, y = next(iter(TokenLoader(tiny_data, "train", L, B)))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, L)
    assert x.is_contiguous() and y.is_contiguous()

    got = Counter(row.tobytes() for b in batches for row in b)
    expected = epoch_windows(tiny_data, "train", seed=3, epoch=0, seq_len=L)
    assert not got - expected  # nothing that is not a window of epoch 0, nothing twice
    m = read_manifest(tiny_data)
    shards = m.shards("train")
    # Documented loss: each shard's tail (< L+1 tokens) + each slot's last partial batch.
    slots = max(1, num_workers)
    order = shard_order(3, 0, len(shards))
    per_slot = [sum(shards[s].tokens // (L + 1) for s in order[g::slots]) for g in range(slots)]
    dropped = m.num_tokens["train"] - sum(got.values()) * (L + 1)
    assert dropped == sum(s.tokens % (L + 1) for s in shards) + sum(w % B for w in per_slot) * (
        L + 1
    )
    assert dropped <= len(shards) * L + slots * (B - 1) * (L + 1)
    assert loader.epoch == 1  # the pass finished epoch 0
    assert len(_take(loader, 3)) == 3  # and the next pass starts epoch 1


def test_one_process_reads_each_unit_in_its_window_order(tiny_data: Path) -> None:
    # One slot: the units of epoch 0 in shard order, each unit's windows in window_order, cut
    # into batches (the last partial one dropped). Expected built from the tar files directly.
    seed = 4
    batches = _take(TokenLoader(tiny_data, "train", L, B, seed=seed, loop=False))
    n = len(read_manifest(tiny_data).shards("train"))
    order = shard_order(seed, 0, n)
    expected = np.concatenate([unit_windows(tiny_data, "train", seed, 0, s, L) for s in order])
    assert np.array_equal(np.concatenate(batches), expected[: len(expected) // B * B])


def test_a_batch_mixes_windows_from_across_its_shard(tiny_data: Path) -> None:
    # Each window's place: (shard, index in the shard's stream, document of its first token).
    W, rows, n_batches = L + 1, 8, 50
    n = len(read_manifest(tiny_data).shards("train"))
    where: dict[bytes, tuple[int, int, int]] = {}
    in_stream_order = []  # what packing without window_order would read: stretches of text
    for s in shard_order(0, 0, n):
        stream, doc = unit_stream(tiny_data, "train", 0, 0, int(s))
        for k in range(len(stream) // W):
            where[stream[k * W : (k + 1) * W].tobytes()] = place = (int(s), k, int(doc[k * W]))
            in_stream_order.append(place)

    def stats(batches: list[list[tuple[int, int, int]]]) -> tuple[float, float]:
        """(mean distinct documents per batch, fraction of row pairs adjacent in the stream)."""
        docs = np.mean([len({(s, d) for s, _, d in b}) for b in batches])
        pairs = [(a, b) for bt in batches for a, b in zip(bt, bt[1:])]
        return float(docs), sum(a[0] == b[0] and b[1] == a[1] + 1 for a, b in pairs) / len(pairs)

    loader = TokenLoader(tiny_data, "train", L, rows, seed=0, loop=False)
    got = [[where[r.tobytes()] for r in b] for b in _take(loader, n_batches)]
    docs, adjacent = stats(got)
    contiguous = [in_stream_order[i * rows : (i + 1) * rows] for i in range(n_batches)]
    docs_contiguous, adjacent_contiguous = stats(contiguous)
    assert docs_contiguous < 1.5 and adjacent_contiguous > 0.9  # the fixture: ~5 docs a shard
    assert docs > 2.5 * docs_contiguous, (docs, docs_contiguous)
    assert adjacent < 0.05, adjacent


def test_loop_reshuffles_every_epoch(tiny_data: Path):
    loader = TokenLoader(tiny_data, "train", L, B, loop=False)
    epoch0 = np.concatenate(_take(loader))
    epoch1 = np.concatenate(_take(loader))
    assert loader.epoch == 2
    assert len(epoch0) == len(epoch1) and not np.array_equal(epoch0, epoch1)
    looping = TokenLoader(tiny_data, "train", L, B, loop=True)
    first = np.concatenate(_take(looping, len(epoch0) // B + 5))
    assert np.array_equal(first[: len(epoch0)], epoch0)  # loop=True runs straight into epoch 1
    assert looping.epoch == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers, stop", [(0, 7), (2, 1), (2, 8), (3, 50), (3, -3)])
def test_exact_resume_in_one_process(tiny_data: Path, num_workers: int, stop: int):
    # stop < 0: loop=False, state taken |stop| batches before the end of the pass, where the
    # workers (unequal shares of shards) run out one after the other.
    loop = stop > 0
    kw: dict[str, Any] = dict(num_workers=num_workers, seed=1, loop=loop)
    ref = _take(TokenLoader(tiny_data, "train", 64, 8, **kw), stop + 40 if loop else None)
    stop = stop if loop else len(ref) + stop
    first = TokenLoader(tiny_data, "train", 64, 8, **kw)
    head = _take(first, stop)
    state = first.state_dict()
    resumed = TokenLoader(tiny_data, "train", 64, 8, **kw)
    resumed.load_state_dict([state])
    tail = _take(resumed, 40 if loop else None)
    assert all(np.array_equal(a, b) for a, b in zip(head + tail, ref, strict=True))


def test_state_is_small_json_and_tracks_only_yielded_batches(tiny_data: Path):
    import json

    loader = TokenLoader(tiny_data, "train", L, B, num_workers=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert len(json.dumps(state)) < 2000
    # One batch yielded from worker slot 0: its slot moved, the other (prefetching) did not.
    assert state["slots"][0]["cur"][1] == B * (L + 1) and state["slots"][1]["cur"] is None
    assert state["next_worker"] == 1


def test_elastic_plan_deals_every_unconsumed_unit_exactly_once():
    rng = random.Random(0)
    horizon = 13 * 6
    tokens = {u: 100 for u in range(horizon * 4)}
    for trial in range(200):
        old_s = rng.randint(1, 6)
        # Simulate slots that consumed some of their units (standard round-robin plan).
        consumed: dict[int, int] = {}
        slots = []
        for g in range(old_s):
            c = _Cursor({"cur": None, "queue": [], "next": g, "stride": old_s})
            for _ in range(rng.randint(0, 12)):
                c.advance()
                c.cur[1] = consumed[c.cur[0]] = 100
            if c.cur is not None and rng.random() < 0.7:
                consumed[c.cur[0]] = c.cur[1] = rng.randint(0, 99)
            slots.append(c.state())
        new_s = rng.randint(1, 7)
        drop = rng.random() < 0.3  # another seq_len: partly read units count as done
        plan = plan_elastic(slots, tokens.__getitem__, new_s, drop_partial=drop)
        seen: Counter[int] = Counter()
        for s in plan:
            for u, off in itertools.takewhile(lambda t: t[0] < horizon, _Cursor(s).pending()):
                assert off == consumed.get(u, 0), (trial, u)
                seen[u] += 1
        left = 1 if drop else 100  # the offset below which a unit is still to read
        remaining = {u for u in range(horizon) if consumed.get(u, 0) < left}
        assert set(seen) == remaining and max(seen.values()) == 1, trial


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_elastic_resume_in_one_process_reads_the_rest_once(tiny_data: Path):
    # Two "ranks" with 2 worker slots each, in this process; resume on one rank, 3 workers.
    seed, stop = 5, 30
    states, head = [], []
    for rank in range(2):
        ld = TokenLoader(
            tiny_data, "train", L, B, rank=rank, world_size=2, num_workers=2, seed=seed, loop=False
        )
        head += _take(ld, stop)
        states.append(ld.state_dict())
    ld = TokenLoader(tiny_data, "train", L, B, num_workers=3, seed=seed, loop=False)
    ld.load_state_dict(states)
    tail = _take(ld)
    got = Counter(row.tobytes() for b in head + tail for row in b)
    expected = epoch_windows(tiny_data, "train", seed=seed, epoch=0, seq_len=L)
    assert not got - expected
    n = len(read_manifest(tiny_data).shards("train"))
    missing = sum((expected - got).values())
    assert missing * (L + 1) <= n * L + 3 * (B - 1) * (L + 1)  # only the new slots' partial batches
    assert ld.epoch == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_with_another_seq_len_drops_partly_read_units_and_repeats_nothing(
    tiny_data: Path,
) -> None:
    # 2 "ranks" x 2 workers read 300 batches each at seq_len L (4 slots: a unit or so done,
    # one partly read each); then one rank with 3 workers resumes at seq_len L2.
    seed, stop, L2 = 5, 300, 48
    states, head = [], []
    for rank in range(2):
        ld = TokenLoader(
            tiny_data, "train", L, B, rank=rank, world_size=2, num_workers=2, seed=seed, loop=False
        )
        head += _take(ld, stop)
        states.append(ld.state_dict())
    ld = TokenLoader(tiny_data, "train", L2, B, num_workers=3, seed=seed, loop=False)
    ld.load_state_dict(states)
    tail = _take(ld)
    assert ld.epoch == 1

    shards = read_manifest(tiny_data).shards("train")

    def per_shard(seq_len: int) -> list[Counter[bytes]]:
        return [
            Counter(r.tobytes() for r in unit_windows(tiny_data, "train", seed, 0, s, seq_len))
            for s in range(len(shards))
        ]

    old, new = per_shard(L), per_shard(L2)
    got_old = Counter(r.tobytes() for b in head for r in b)
    got_new = Counter(r.tobytes() for b in tail for r in b)
    assert not got_old - sum(old, Counter()) and not got_new - sum(new, Counter())

    def read(got: Counter[bytes], per_shard: list[Counter[bytes]]) -> set[int]:
        """The shards `got` has windows of (a window found in one shard only names it)."""
        owners = defaultdict(set)
        for s, windows in enumerate(per_shard):
            for w in windows:
                owners[w].add(s)
        return {next(iter(owners[w])) for w in got if len(owners[w]) == 1}

    read_old, read_new = read(got_old, old), read(got_new, new)
    assert not read_old & read_new  # no shard read at both lengths: no token twice
    assert read_old | read_new == set(range(len(shards)))
    partial = {s for s in read_old if old[s] - got_old}  # the old run was in the middle of these
    done = read_old - partial
    assert 1 <= len(partial) <= 4 and done  # at most one unit per old slot is cut short
    # The new run read every other shard whole, but for its 3 slots' final partial batches.
    assert sum((sum((new[s] for s in read_new), Counter()) - got_new).values()) <= 3 * (B - 1)
    total = sum(s.tokens for s in shards)
    dropped = total - sum(got_old.values()) * (L + 1) - sum(got_new.values()) * (L2 + 1)
    bound = len(shards) * L2 + sum(shards[s].tokens for s in partial) + 3 * (B - 1) * (L2 + 1)
    assert 0 < dropped <= bound, (dropped, bound, partial, done)


def test_load_state_dict_refuses_incomplete_or_foreign_states(tiny_data: Path):
    a = TokenLoader(tiny_data, "train", L, B, rank=0, world_size=2, seed=0)
    state = a.state_dict()
    b = TokenLoader(tiny_data, "train", L, B, seed=0)
    with pytest.raises(DataError, match=r"all 2 ranks of the saving run, got ranks \[0\]"):
        b.load_state_dict([state])
    c = TokenLoader(tiny_data, "train", L, B, rank=0, world_size=2, seed=9)
    with pytest.raises(DataError, match="seed=0.*seed=9"):
        c.load_state_dict([state, state | {"rank": 1}])
    # A state of the earlier window order (same keys, older format) is refused, by name.
    old = TokenLoader(tiny_data, "train", L, B, seed=0).state_dict()
    assert STATE_FORMAT != "pretrain.TokenLoader/1"
    with pytest.raises(DataError, match=r"format 'pretrain.TokenLoader/1', this version reads"):
        b.load_state_dict([old | {"format": "pretrain.TokenLoader/1"}])
    with pytest.raises(DataError, match="not a TokenLoader state"):
        b.load_state_dict([old | {"format": "something else"}])


def test_too_few_shards_and_missing_split_are_clear(tiny_data: Path):
    n = len(read_manifest(tiny_data).shards("train"))
    with pytest.raises(
        DataError,
        match=rf"has {n} shards, but 32 ranks × 4 workers need at least 128(.|\n)*smaller shard_tokens",
    ):
        TokenLoader(tiny_data, "train", L, B, rank=0, world_size=32, num_workers=4)
    with pytest.raises(DataError, match="split 'test' is not in"):
        TokenLoader(tiny_data, "test", L, B)
    with pytest.raises(DataError, match="does not exist; prepare one with"):
        TokenLoader(tiny_data / "nope", "train", L, B)


def test_tokenizer_mismatch_names_both_sides(tiny_data: Path):
    m = read_manifest(tiny_data)
    TokenLoader(tiny_data, "train", L, B, expected_tokenizer_sha256=m.tokenizer_sha256)
    with pytest.raises(
        DataError,
        match=r"tokenizer abcabcabcabc does not match the shards in .*prepared with tokenizer.model sha256 "
        + m.tokenizer_sha256[:12]
        + r".*re-run prepare",
    ):
        TokenLoader(tiny_data, "train", L, B, expected_tokenizer_sha256="abc" * 21 + "a")


def test_missing_truncated_and_corrupt_shards_are_named(data_copy: Path):
    shards = read_manifest(data_copy).shards("train")
    victim = data_copy / shards[3].name
    original = victim.read_bytes()

    victim.unlink()
    with pytest.raises(
        ShardError, match=rf"shard {victim} is missing: re-copy the data dir or re-run"
    ):
        TokenLoader(data_copy, "train", L, B)
    victim.write_bytes(original[:-512])
    with pytest.raises(
        ShardError,
        match=rf"{victim} has {len(original) - 512:,} bytes, the manifest says {len(original):,}",
    ):
        TokenLoader(data_copy, "train", L, B)

    # Same size, damaged tar header of the second member: only sha256 or parsing can tell.
    first_size = int(original[124:136].rstrip(b"\0 ").decode(), 8)
    second = 512 + (first_size + 511) // 512 * 512
    victim.write_bytes(original[:second] + b"\x13" * 512 + original[second + 512 :])
    with pytest.raises(ShardError, match=rf"{victim} is corrupt \(sha256"):
        TokenLoader(data_copy, "train", L, B, verify_sha256=True)
    for workers in (0, 2):
        loader = TokenLoader(data_copy, "train", L, B, num_workers=workers, loop=False)
        with pytest.raises(ShardError, match=rf"shard {shards[3].name} from .* is corrupt"):
            for _ in loader:
                pass


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_http_and_pipe_urls_give_the_same_batches(tiny_data: Path):
    local = _take(TokenLoader(tiny_data, "train", L, B, seed=2), 60)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tiny_data))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        remote = _take(TokenLoader(url, "train", L, B, seed=2, verify_sha256=True), 60)
        assert all(np.array_equal(a, b) for a, b in zip(local, remote, strict=True))
        with pytest.raises(DataError, match="cannot read"):
            TokenLoader(url + "missing/", "train", L, B)
    finally:
        server.shutdown()

    pipe = f"pipe:cat {tiny_data}/{{path}}"
    with pytest.raises(DataError, match="runs in a shell; pass allow_pipe=True"):
        TokenLoader(pipe, "train", L, B)
    piped = _take(TokenLoader(pipe, "train", L, B, seed=2, allow_pipe=True, num_workers=2), 60)
    ref2 = _take(TokenLoader(tiny_data, "train", L, B, seed=2, num_workers=2), 60)
    assert all(np.array_equal(a, b) for a, b in zip(ref2, piped, strict=True))
    with pytest.raises(DataError, match=r"must contain \{path\}"):
        TokenLoader(f"pipe:cat {tiny_data}/manifest.json", "train", L, B, allow_pipe=True)
