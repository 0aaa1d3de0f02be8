"""TokenLoader across real processes (torchrun, 2 ranks x 2 DataLoader workers): exactly once,
deterministic, exact resume and elastic resume to 1 and 4 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.data import read_manifest
from pretrain.data.loader import shard_order
from tests.conftest import test_env, torchrun
from tests.data_fixtures import epoch_windows

WORKER = str(Path(__file__).with_name("loader_worker.py"))
L, B, SEED, SAVE_AT = 64, 8, 7, 25


def _run(nproc: int, data: Path, out: Path, *args: str) -> dict[str, list[Any]]:
    """Run loader_worker.py on `nproc` ranks; {"pass0": [rank0, rank1, ...], "resumed-pass0": ...}."""
    cmd = [
        WORKER,
        str(data),
        str(out),
        "--seq-len",
        str(L),
        "--batch",
        str(B),
        "--seed",
        str(SEED),
        *args,
    ]
    if nproc > 1:
        torchrun(nproc, cmd, timeout=300)
    else:  # one rank needs no launcher (saves torchrun's own start-up)
        env = test_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        proc = subprocess.run(
            [sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-6000:]
    passes: dict[str, list[Any]] = {}
    for f in sorted(out.glob("*pass*-rank*.npy")):
        p, r = f.stem.rsplit("-", 1)
        passes.setdefault(p, [None] * nproc)[int(r[4:])] = np.load(f)
    return passes


def _rows(batches: list[np.ndarray]) -> Counter[bytes]:
    return Counter(row.tobytes() for arr in batches for batch in arr for row in batch)


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 ranks x 2 workers: two passes (epochs 0 and 1), states saved after SAVE_AT batches."""
    out = tmp_path_factory.mktemp("loader_ref")
    passes = _run(2, tiny_data, out, "--workers", "2", "--passes", "2", "--save-at", str(SAVE_AT))
    return {"out": out, **passes}


@pytest.mark.timeout(300)
def test_one_epoch_gives_every_token_to_exactly_one_rank_once(tiny_data: Path, reference: dict):
    got = _rows(reference["pass0"])
    expected = epoch_windows(tiny_data, "train", SEED, 0, L)
    assert not got - expected  # no window twice, none foreign
    # What is missing is exactly the documented tails: shard remainders + partial batches.
    m = read_manifest(tiny_data)
    shards = m.shards("train")
    slots = 2 * 2
    order = shard_order(SEED, 0, len(shards))
    per_slot = [sum(shards[s].tokens // (L + 1) for s in order[g::slots]) for g in range(slots)]
    dropped = m.num_tokens["train"] - sum(got.values()) * (L + 1)
    assert dropped == sum(s.tokens % (L + 1) for s in shards) + sum(w % B for w in per_slot) * (
        L + 1
    )
    assert dropped <= len(shards) * L + slots * (B - 1) * (L + 1)
    # Token content, independently of windows: the yielded token histogram fits in the shards'.
    hist_got = np.bincount(
        np.concatenate([a.ravel() for a in reference["pass0"]]), minlength=m.vocab_size
    )
    hist_all = np.bincount(
        np.concatenate([np.frombuffer(w, "<u2") for w in expected.elements()]),
        minlength=m.vocab_size,
    )
    assert (hist_got <= hist_all).all() and hist_got.sum() == sum(got.values()) * (L + 1)
    for r in range(2):  # both ranks did real work
        assert len(reference["pass0"][r]) > 2 * SAVE_AT
    assert all(
        json.loads((reference["out"] / f"epoch-rank{r}.json").read_text())["epoch"] == 2
        for r in range(2)
    )


@pytest.mark.timeout(300)
def test_same_seed_same_batches_exact_resume_and_new_order_each_epoch(
    tiny_data: Path, reference: dict, tmp_path: Path
):
    # One more run of 2 ranks x 2 workers: first fresh, then resumed from the states taken
    # after SAVE_AT batches (a new loader in the same processes).
    run = _run(
        2,
        tiny_data,
        tmp_path / "again",
        "--workers",
        "2",
        "--passes",
        "2",
        "--resume",
        str(reference["out"] / "state-rank*.json"),
    )
    for r in range(2):
        # Same seed and world size: identical batches on every rank, every run.
        assert np.array_equal(run["pass0"][r], reference["pass0"][r]), r
        assert np.array_equal(run["pass1"][r], reference["pass1"][r]), r
        # Exact resume: the rest of the epoch, and the next one, are exactly the reference's.
        assert np.array_equal(run["resumed-pass0"][r], reference["pass0"][r][SAVE_AT:]), r
        assert np.array_equal(run["resumed-pass1"][r], reference["pass1"][r]), r
        # Epoch 1 is a different order (and packing) of the same data.
        n = min(len(reference["pass0"][r]), len(reference["pass1"][r]))
        assert not np.array_equal(reference["pass0"][r][:n], reference["pass1"][r][:n])
    assert _rows(reference["pass0"]) != _rows(reference["pass1"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc, workers", [(1, 3), (4, 2)])
def test_elastic_resume_finishes_the_epoch_without_repeating_or_losing_tokens(
    tiny_data: Path, reference: dict, tmp_path: Path, nproc: int, workers: int
):
    resumed = _run(
        nproc,
        tiny_data,
        tmp_path / "elastic",
        "--workers",
        str(workers),
        "--resume",
        str(reference["out"] / "state-rank*.json"),
    )
    before = [arr[:SAVE_AT] for arr in reference["pass0"]]
    got = _rows(before) + _rows(resumed["resumed-pass0"])
    expected = epoch_windows(tiny_data, "train", SEED, 0, L)
    assert not got - expected  # nothing read twice
    n_shards = len(read_manifest(tiny_data).shards("train"))
    missing = sum((expected - got).values())
    # Lost: only shard tails (in `expected` already) and the new slots' final partial batches.
    assert missing <= nproc * workers * (B - 1)
    assert missing * (L + 1) <= n_shards * L + nproc * workers * (B - 1) * (L + 1)
    for r in range(nproc):
        epoch = json.loads((tmp_path / "elastic" / f"resumed-epoch-rank{r}.json").read_text())
        assert epoch["epoch"] == 1
