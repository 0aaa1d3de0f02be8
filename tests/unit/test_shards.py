"""Shards and the loader in one process: URLs (local, http, pipe), integrity on every read, the
global stream and its mixing, exact and elastic resume, memory held."""

from __future__ import annotations

import functools
import hashlib
import http.server
import itertools
import json
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pretrain.data import DataError, ShardError, TokenLoader, read_manifest
from pretrain.data.loader import STATE_FORMAT
from tests.data_fixtures import (
    as_windows,
    epoch_windows,
    flip_byte_in_member,
    global_stream,
    replace_member_same_size,
)

# 24 partitions: 1, 2, 3, 4 ranks x 1, 2, 3 workers divide it.
L, B, P = 32, 4, 24


def _take(loader: TokenLoader, n: int | None = None) -> list[np.ndarray]:
    return [as_windows(x, y) for x, y in itertools.islice(loader, n)]


def _loader(data: Path, **kw: Any) -> TokenLoader:
    args: dict[str, Any] = dict(seq_len=L, batch_size=B, partitions=P) | kw
    return TokenLoader(data, "train", args.pop("seq_len"), args.pop("batch_size"), **args)


def _interleave(per_rank: list[np.ndarray]) -> np.ndarray:
    """The global stream from each rank's local windows: global window q·R + r is rank r's q-th."""
    R = len(per_rank)
    n = min(len(p) for p in per_rank)
    out = np.empty((n * R, per_rank[0].shape[1]), per_rank[0].dtype)
    for r, p in enumerate(per_rank):
        out[r::R] = p[:n]
    return out


@pytest.fixture
def data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_pass_yields_each_window_once_and_drops_only_the_documented_tails(
    tiny_data: Path, num_workers: int
):
    loader = _loader(tiny_data, num_workers=num_workers, loop=False, seed=3)
    batches = _take(loader)
    x, y = next(iter(_loader(tiny_data)))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, L)
    assert x.is_contiguous() and y.is_contiguous()

    got = Counter(row.tobytes() for b in batches for row in b)
    expected = epoch_windows(tiny_data, "train", seed=3, epoch=0, seq_len=L, partitions=P)
    assert not got - expected  # nothing that is not a window of epoch 0, nothing twice
    m = read_manifest(tiny_data)
    shards = m.shards("train")
    # Documented loss: each shard's tail (< L+1 tokens), the layout's last N mod P windows and
    # the final partial batch.
    n_windows = sum(s.tokens // (L + 1) for s in shards)
    dropped = m.num_tokens["train"] - sum(got.values()) * (L + 1)
    tails = sum(s.tokens % (L + 1) for s in shards)
    assert sum(expected.values()) == loader.windows_per_epoch == n_windows // P * P
    assert dropped == tails + (n_windows % P + loader.windows_per_epoch % B) * (L + 1)
    assert dropped <= len(shards) * L + (P - 1 + B - 1) * (L + 1)
    assert loader.epoch == 1  # the pass finished epoch 0
    assert len(_take(loader, 3)) == 3  # and the next pass starts epoch 1


def test_one_process_reads_the_documented_global_stream(tiny_data: Path) -> None:
    # Expected built from the tar files directly, by the module docstring's definition.
    seed = 4
    batches = _take(_loader(tiny_data, seed=seed, loop=False))
    expected, _ = global_stream(tiny_data, "train", seed, 0, L, P)
    assert np.array_equal(np.concatenate(batches), expected[: len(expected) // B * B])


def test_same_global_stream_at_any_world_size_workers_and_batch(tiny_data: Path) -> None:
    # Ranks are a view on one stream: rank r's q-th window is global window q·R + r.
    n = 96  # global windows compared
    ref, _ = global_stream(tiny_data, "train", 5, 0, L, P)
    for world, workers, batch in [(1, 0, 8), (1, 3, 6), (2, 2, 4), (3, 1, 2), (4, 2, 3)]:
        per_rank = [
            np.concatenate(
                _take(
                    _loader(
                        tiny_data,
                        rank=r,
                        world_size=world,
                        num_workers=workers,
                        seed=5,
                        batch_size=batch,
                    ),  # fmt: skip
                    n // world // batch + 1,
                )
            )
            for r in range(world)
        ]
        got = _interleave(per_rank)
        assert np.array_equal(got[:n], ref[:n]), (world, workers, batch)


def test_batches_mix_many_shards(tiny_data: Path) -> None:
    # Each window's shard, from the documented layout; today's order (a reader reads one shard
    # at a time) would give a batch one shard, two at a boundary.
    rows, n_batches = 8, 50
    stream, shard = global_stream(tiny_data, "train", 0, 0, L, P)
    where = dict(zip((r.tobytes() for r in stream), shard.tolist()))
    got = [
        [where[r.tobytes()] for r in b]
        for b in _take(_loader(tiny_data, batch_size=rows), n_batches)
    ]
    distinct = [len(set(b)) for b in got]
    # 8 windows from 8 slots whose ranges are random places of the epoch (~40 shards of which
    # each range spans 2-3): nearly all in different shards.
    assert np.mean(distinct) >= 0.75 * rows, distinct
    # Consecutive batches are not one shard's text: they share few shards.
    shared = [len(set(a) & set(b)) for a, b in zip(got, got[1:])]
    assert np.mean(shared) <= rows / 4, shared


def test_loop_reshuffles_every_epoch(tiny_data: Path):
    loader = _loader(tiny_data, loop=False)
    epoch0 = np.concatenate(_take(loader))
    epoch1 = np.concatenate(_take(loader))
    assert loader.epoch == 2
    assert len(epoch0) == len(epoch1) and not np.array_equal(epoch0, epoch1)
    looping = _loader(tiny_data, loop=True)
    first = np.concatenate(_take(looping, len(epoch0) // B + 5))
    per_epoch = looping.windows_per_epoch
    assert np.array_equal(first[: len(epoch0)], epoch0)  # loop=True runs straight into epoch 1
    expected1, _ = global_stream(tiny_data, "train", 0, 1, L, P)
    assert np.array_equal(first[per_epoch:], expected1[: len(first) - per_epoch])
    assert looping.epoch == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers, stop", [(0, 7), (2, 1), (2, 9), (3, 50), (3, -3)])
def test_exact_resume_in_one_process(tiny_data: Path, num_workers: int, stop: int):
    # stop < 0: loop=False, state taken |stop| batches before the end of the pass.
    loop = stop > 0
    kw: dict[str, Any] = dict(num_workers=num_workers, seed=1, loop=loop, seq_len=64, batch_size=8)
    ref = _take(_loader(tiny_data, **kw), stop + 40 if loop else None)
    stop = stop if loop else len(ref) + stop
    first = _loader(tiny_data, **kw)
    head = _take(first, stop)
    state = first.state_dict()
    resumed = _loader(tiny_data, **kw)
    resumed.load_state_dict([state])
    tail = _take(resumed, 40 if loop else None)
    assert all(np.array_equal(a, b) for a, b in zip(head + tail, ref, strict=True))


def test_state_is_small_json_and_tracks_only_yielded_batches(tiny_data: Path):
    loader = _loader(tiny_data, num_workers=2)
    it = iter(loader)
    next(it)  # the workers have prefetched more than this by now
    state = loader.state_dict()
    assert len(json.dumps(state)) < 500
    assert state["position"] == B and state["global_position"] == B
    next(it)
    assert loader.state_dict()["position"] == 2 * B


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_elastic_resume_continues_the_global_stream_exactly(tiny_data: Path):
    # Two "ranks" x 2 workers in this process stop after 30 batches; one rank with 3 workers
    # and another batch size, and 4 ranks, take over: the global stream goes on unchanged.
    seed, stop = 5, 30
    loaders = [_loader(tiny_data, rank=r, world_size=2, num_workers=2, seed=seed) for r in range(2)]
    head = _interleave([np.concatenate(_take(ld, stop)) for ld in loaders])
    states = [ld.state_dict() for ld in loaders]
    ref, _ = global_stream(tiny_data, "train", seed, 0, L, P)
    assert np.array_equal(head, ref[: len(head)])
    one = _loader(tiny_data, num_workers=3, seed=seed, batch_size=6)
    one.load_state_dict(states)
    tail = np.concatenate(_take(one, 20))
    assert np.array_equal(tail, ref[len(head) : len(head) + len(tail)])
    four = [_loader(tiny_data, rank=r, world_size=4, seed=seed, batch_size=2) for r in range(4)]
    for ld in four:
        ld.load_state_dict(states)
    tail4 = _interleave([np.concatenate(_take(ld, 10)) for ld in four])
    assert np.array_equal(tail4, ref[len(head) : len(head) + len(tail4)])


def test_resume_with_another_seq_len_starts_the_next_epoch(tiny_data: Path) -> None:
    # The windows of another seq_len are other windows: nothing is read twice in an epoch, the
    # rest of the epoch at the old seq_len is skipped, the new run starts epoch 1.
    seed, L2 = 5, 48
    loaders = [_loader(tiny_data, rank=r, world_size=2, seed=seed) for r in range(2)]
    for ld in loaders:
        _take(ld, 30)
    ld2 = _loader(tiny_data, seed=seed, seq_len=L2)
    ld2.load_state_dict([ld.state_dict() for ld in loaders])
    assert ld2.epoch == 1 and ld2.state_dict()["position"] == ld2.windows_per_epoch
    expected, _ = global_stream(tiny_data, "train", seed, 1, L2, P)
    assert np.array_equal(np.concatenate(_take(ld2, 5)), expected[: 5 * B])


def test_load_state_dict_refuses_incomplete_or_foreign_states(tiny_data: Path):
    a = _loader(tiny_data, rank=0, world_size=2, seed=0)
    state = a.state_dict()
    b = _loader(tiny_data, seed=0)
    with pytest.raises(DataError, match=r"all 2 ranks of the saving run, got ranks \[0\]"):
        b.load_state_dict([state])
    c = _loader(tiny_data, rank=0, world_size=2, seed=9)
    with pytest.raises(DataError, match="data.seed=0.*data.seed=9"):
        c.load_state_dict([state, state | {"rank": 1}])
    d = _loader(tiny_data, partitions=12)
    with pytest.raises(DataError, match="data.partitions=24, this loader has data.partitions=12"):
        d.load_state_dict([state, state | {"rank": 1}])
    with pytest.raises(DataError, match="disagree on global_position"):
        b.load_state_dict([state, state | {"rank": 1, "global_position": 8}])
    # States of the earlier orders (format /1 and /2) are refused, by name, with what to do.
    assert STATE_FORMAT == "pretrain.TokenLoader/3"
    for old in ("pretrain.TokenLoader/1", "pretrain.TokenLoader/2"):
        with pytest.raises(
            DataError, match=rf"format '{old}', this version reads(.|\n)*start a new run"
        ):
            b.load_state_dict([{"format": old, "slots": [], "rank": 0}])
    with pytest.raises(DataError, match="not a TokenLoader state"):
        b.load_state_dict([state | {"format": "something else"}])


def test_partitions_must_be_shared_evenly_and_fit_the_split(tiny_data: Path):
    with pytest.raises(
        DataError,
        match=r"data.partitions=24 is not a multiple of world_size 4 x num_workers 4 = 16",
    ):
        _loader(tiny_data, rank=0, world_size=4, num_workers=4)
    n = read_manifest(tiny_data).num_tokens["train"]
    with pytest.raises(
        DataError, match=r"fewer than data.partitions=1048576(.|\n)*fewer partitions"
    ):
        _loader(tiny_data, partitions=1 << 20)
    assert n // (L + 1) < 1 << 20
    with pytest.raises(DataError, match="split 'test' is not in"):
        TokenLoader(tiny_data, "test", L, B)
    with pytest.raises(DataError, match="does not exist; prepare one with"):
        TokenLoader(tiny_data / "nope", "train", L, B)
    # None (validation): as many partitions as the split allows, shared by the readers.
    assert TokenLoader(tiny_data, "val", L, B, partitions=None).partitions <= 1024


def test_first_shards_names_what_a_rank_reads_first(tiny_data: Path) -> None:
    for rank in range(2):
        ld = _loader(tiny_data, rank=rank, world_size=2, seed=2)
        _, shard = global_stream(tiny_data, "train", 2, 0, L, P)
        names = [read_manifest(tiny_data).shards("train")[s].name for s in shard[rank::2]]
        assert ld.first_shards(4) == list(dict.fromkeys(names))[:4]
        assert _loader(tiny_data, world_size=2, seed=2).first_shards(
            4, rank=rank
        ) == ld.first_shards(4)


def test_a_reader_holds_at_most_the_documented_shards(tiny_data: Path) -> None:
    for partitions in (4, 24):
        ld = _loader(tiny_data, partitions=partitions, loop=False)
        _take(ld)
        n = len(read_manifest(tiny_data).shards("train"))
        # One source's slots are in at most two epochs at once (a chunk spans two rows).
        assert ld._reader.peak_shards <= min(2 * n, 2 * partitions + 1)
        assert ld._reader.peak_bytes <= ld.memory_bound_bytes()
        assert ld._reader.sources[0].loads == n  # a pass reads each shard once  # type: ignore[union-attr]
    assert ld._reader.peak_shards > 4  # and 24 partitions do interleave many shards


def test_tokenizer_mismatch_names_both_sides(tiny_data: Path):
    m = read_manifest(tiny_data)
    _loader(tiny_data, expected_tokenizer_sha256=m.tokenizer_sha256)
    with pytest.raises(
        DataError,
        match=r"tokenizer abcabcabcabc does not match the shards in .*prepared with sentencepiece "
        + r".*tokenizer.model \(sha256 "
        + m.tokenizer_sha256[:12]
        + rf", {m.vocab_size} ids\).*re-run prepare",
    ):
        _loader(tiny_data, expected_tokenizer_sha256="abc" * 21 + "a")


def test_missing_and_truncated_shards_are_named_up_front(data_copy: Path):
    shards = read_manifest(data_copy).shards("train")
    victim = data_copy / shards[3].name
    original = victim.read_bytes()
    victim.unlink()
    with pytest.raises(ShardError, match=rf"shard {victim} is missing: re-copy the data dir"):
        _loader(data_copy)
    victim.write_bytes(original[:-512])
    with pytest.raises(
        ShardError,
        match=rf"{victim} has {len(original) - 512:,} bytes, the manifest says {len(original):,}",
    ):
        _loader(data_copy)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("damage", ["flip", "swap", "header"])
def test_corrupt_shards_are_caught_on_every_read_before_any_batch_of_them(
    data_copy: Path, damage: str
):
    m = read_manifest(data_copy)
    shards = m.shards("train")
    first = _loader(data_copy, seed=1).first_shards(12)
    victim_name = first[-1]  # the 12th shard read: after a few batches of others
    victim = data_copy / victim_name
    before = {s.name: (data_copy / s.name).read_bytes() for s in shards}
    stream, shard = global_stream(data_copy, "train", 1, 0, L, P)  # of the intact shards
    if damage == "flip":
        flip_byte_in_member(victim)
    elif damage == "swap":
        replace_member_same_size(victim, [data_copy / n for n in first[:-1]])
    else:  # a damaged tar header of the second member: a tar reader would stop early
        data = victim.read_bytes()
        size = int(data[124:136].rstrip(b"\0 ").decode(), 8)
        at = 512 + (size + 511) // 512 * 512
        victim.write_bytes(data[:at] + b"\x13" * 512 + data[at + 512 :])
    assert victim.stat().st_size == len(before[victim_name])  # same size: only the hash can tell
    found = hashlib.sha256(victim.read_bytes()).hexdigest()
    expected = next(s.sha256 for s in shards if s.name == victim_name)
    message = (
        rf"shard {victim_name} \(.*\) is corrupt: its sha256 is {found}, the manifest says "
        rf"{expected}(.|\n)*re-copy the data dir(.|\n)*re-run `python -m pretrain.prepare"
    )
    # The up-front check (data.verify_sha256) finds it before anything is read.
    with pytest.raises(ShardError, match=message):
        _loader(data_copy, seed=1, verify_sha256=True)
    # Without it, the read finds it: in-process and in DataLoader workers, as one clean error,
    # and no window of the shard was ever yielded.
    victim_index = next(i for i, s in enumerate(shards) if s.name == victim_name)
    for workers in (0, 2):
        seen: list[np.ndarray] = []
        with pytest.raises(ShardError, match=message) as info:
            for x, y in _loader(data_copy, seed=1, num_workers=workers):
                seen.append(as_windows(x, y))
        assert "Traceback" not in str(info.value) and "Caught" not in str(info.value)
        assert seen, "the shard is not among the first batches' shards"
        got = np.concatenate(seen)
        assert np.array_equal(got, stream[: len(got)])  # every batch before it was intact
        assert victim_index not in set(shard[: len(got)].tolist())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_http_and_pipe_urls_give_the_same_batches(tiny_data: Path):
    local = _take(_loader(tiny_data, seed=2), 60)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tiny_data))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        remote = _take(_loader(url, seed=2), 60)
        assert all(np.array_equal(a, b) for a, b in zip(local, remote, strict=True))
        with pytest.raises(DataError, match="cannot read"):
            TokenLoader(url + "missing/", "train", L, B)
    finally:
        server.shutdown()

    pipe = f"pipe:cat {tiny_data}/{{path}}"
    with pytest.raises(DataError, match="runs in a shell; pass allow_pipe=True"):
        TokenLoader(pipe, "train", L, B)
    piped = _take(_loader(pipe, seed=2, allow_pipe=True, num_workers=2), 60)
    assert all(np.array_equal(a, b) for a, b in zip(local, piped, strict=True))
    with pytest.raises(DataError, match=r"must contain \{path\}"):
        TokenLoader(f"pipe:cat {tiny_data}/manifest.json", "train", L, B, allow_pipe=True)


def test_the_shard_reader_reads_what_tarfile_reads(tiny_data: Path, sft_data: Path) -> None:
    import tarfile

    from pretrain.data.format import tar_members

    for data in (tiny_data, sft_data):
        for split in ("train", "val"):
            for s in read_manifest(data).shards(split):
                raw = (data / s.name).read_bytes()
                with tarfile.open(data / s.name) as tar:
                    expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
                assert [(n, bytes(d)) for n, d in tar_members(raw)] == expected
    raw = (tiny_data / read_manifest(tiny_data).shards("train")[0].name).read_bytes()
    for bad in (raw[:700], b"\x13" * 1024, raw[:257] + b"XXXXX" + raw[262:]):
        with pytest.raises(ValueError):
            tar_members(bad)
