"""TokenLoader across real processes (torchrun, 2 ranks x 2 DataLoader workers): one global
stream whatever the world size, exactly once per epoch, deterministic, exact resume, and
elastic resume to 1 and 4 ranks that continues the same global stream; the same for a mixture
of two sources (one with loss masks), and a change of mixture at resume."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.data import Source, TokenLoader, read_manifest
from tests.conftest import test_env, torchrun
from tests.data_fixtures import epoch_windows, global_stream

WORKER = str(Path(__file__).with_name("loader_worker.py"))
# 24 partitions: 2 x 2, 1 x 3 and 4 x 2 ranks x workers all divide it.
L, B, SEED, SAVE_AT, P = 64, 8, 7, 25, 24


def _run(nproc: int, data: Path | str, out: Path, *args: str) -> dict[str, list[Any]]:
    """Run loader_worker.py on `nproc` ranks; {"pass0": [rank0, rank1, ...], "resumed-pass0": ...}."""
    cmd = [WORKER, str(data), str(out), "--seq-len", str(L), "--batch", str(B), "--seed",
           str(SEED), "--partitions", str(P), *args]  # fmt: skip
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


def _global(per_rank: list[np.ndarray]) -> np.ndarray:
    """The global stream from the ranks' batches: global window q·R + r is rank r's q-th."""
    flat = [a.reshape(-1, L + 1) for a in per_rank]
    R, n = len(flat), min(len(a) for a in flat)
    out = np.empty((n * R, L + 1), flat[0].dtype)
    for r, a in enumerate(flat):
        out[r::R] = a[:n]
    return out


def _rows(batches: list[np.ndarray]) -> Counter[bytes]:
    return Counter(row.tobytes() for arr in batches for batch in arr for row in batch)


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 ranks x 2 workers: two passes (epochs 0 and 1), states saved after SAVE_AT batches."""
    out = tmp_path_factory.mktemp("loader_ref")
    passes = _run(2, tiny_data, out, "--workers", "2", "--passes", "2", "--save-at", str(SAVE_AT))
    return {"out": out, **passes}


@pytest.mark.timeout(300)
def test_ranks_read_the_global_stream_each_window_once_per_epoch(tiny_data: Path, reference: dict):
    expected = epoch_windows(tiny_data, "train", SEED, 0, L, P)
    got = _rows(reference["pass0"])
    assert not got - expected  # no window twice, none foreign
    # The two ranks' batches interleave into the documented global stream.
    stream, _ = global_stream(tiny_data, "train", SEED, 0, L, P)
    assert np.array_equal(_global(reference["pass0"]), stream[: len(_global(reference["pass0"]))])
    # What is missing is exactly the documented tails: shard remainders, the layout's last
    # N mod P windows, and each rank's final partial batch.
    m = read_manifest(tiny_data)
    shards = m.shards("train")
    n_windows = sum(s.tokens // (L + 1) for s in shards)
    per_rank = n_windows // P * P // 2
    dropped = m.num_tokens["train"] - sum(got.values()) * (L + 1)
    tails = sum(s.tokens % (L + 1) for s in shards)
    assert dropped == tails + (n_windows % P + 2 * (per_rank % B)) * (L + 1)
    assert dropped <= len(shards) * L + (P - 1 + 2 * (B - 1)) * (L + 1)
    for r in range(2):  # both ranks did the same amount of work
        assert len(reference["pass0"][r]) == per_rank // B > 2 * SAVE_AT
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
    run = _run(2, tiny_data, tmp_path / "again", "--workers", "2", "--passes", "2", "--resume",
               str(reference["out"] / "state-rank*.json"))  # fmt: skip
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
def test_elastic_resume_continues_the_global_stream(
    tiny_data: Path, reference: dict, tmp_path: Path, nproc: int, workers: int
):
    resumed = _run(nproc, tiny_data, tmp_path / "elastic", "--workers", str(workers),
                   "--resume", str(reference["out"] / "state-rank*.json"), "--fresh", "0")  # fmt: skip
    head = _global([arr[:SAVE_AT] for arr in reference["pass0"]])
    tail = _global(resumed["resumed-pass0"])
    stream, _ = global_stream(tiny_data, "train", SEED, 0, L, P)
    # The uninterrupted run's global order, continued exactly where the 2 ranks stopped.
    assert len(head) == 2 * SAVE_AT * B
    assert np.array_equal(np.concatenate([head, tail]), stream[: len(head) + len(tail)])
    # ... to the end of the epoch: all of it but the new ranks' final partial batches.
    assert len(stream) - len(head) - len(tail) == nproc * ((len(stream) - len(head)) // nproc % B)
    for r in range(nproc):
        epoch = json.loads((tmp_path / "elastic" / f"resumed-epoch-rank{r}.json").read_text())
        assert epoch["epoch"] == 1


# ---- a mixture across real processes


def _spec(tiny_data: Path, sft_data: Path, web: float, sft: float) -> str:
    return f"web={tiny_data}:{web},sft={sft_data}:{sft}"


def _in_process(tiny_data: Path, sft_data: Path, web: float, sft: float, states: Any = None):
    """One rank's loop=False pass of the mixture in this process, saved as the worker saves it
    (x, then y's last token), [windows, L + 1]; and the loader."""
    loader = TokenLoader(
        [Source("web", read_manifest(tiny_data), web), Source("sft", read_manifest(sft_data), sft)],
        "train", L, B, seed=SEED, partitions=P, loop=False,
    )  # fmt: skip
    if states is not None:
        loader.load_state_dict(states)
    rows = [np.concatenate([x.numpy(), y[:, -1:].numpy()], 1).astype("<u2") for x, y in loader]
    return np.concatenate(rows), loader


@pytest.fixture(scope="module")
def mix_reference(
    tiny_data: Path, sft_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """A 0.6 / 0.4 mixture on 2 ranks x 2 workers: one pass, states saved after SAVE_AT batches."""
    out = tmp_path_factory.mktemp("mix_ref")
    spec = _spec(tiny_data, sft_data, 0.6, 0.4)
    return {"out": out, **_run(2, spec, out, "--workers", "2", "--save-at", str(SAVE_AT))}


@pytest.mark.timeout(300)
def test_a_mixture_across_processes_is_one_stream_and_resumes_elastically(
    tiny_data: Path, sft_data: Path, mix_reference: dict, tmp_path: Path
) -> None:
    ref, _ = _in_process(tiny_data, sft_data, 0.6, 0.4)
    got = _global(mix_reference["pass0"])
    assert len(got) == len(ref) // (2 * B) * 2 * B and np.array_equal(got, ref[: len(got)])
    # 1 rank x 3 workers takes over from the 2 ranks' states: the same stream goes on.
    states = str(mix_reference["out"] / "state-rank*.json")
    spec = _spec(tiny_data, sft_data, 0.6, 0.4)
    resumed = _run(1, spec, tmp_path / "elastic", "--workers", "3", "--resume", states, "--fresh", "0")  # fmt: skip
    head = _global([arr[:SAVE_AT] for arr in mix_reference["pass0"]])
    tail = _global(resumed["resumed-pass0"])
    assert np.array_equal(np.concatenate([head, tail]), ref[: len(head) + len(tail)])


@pytest.mark.timeout(300)
def test_a_change_of_mixture_at_resume_across_processes(
    tiny_data: Path, sft_data: Path, mix_reference: dict, tmp_path: Path
) -> None:
    # 2 ranks x 1 worker resume the 0.6 / 0.4 run's states with 0.2 / 0.8: what they read is
    # what one process reads from the same states (tested against the sources in
    # tests/unit/test_mixture.py), and each rank reports the change.
    files = sorted((mix_reference["out"]).glob("state-rank*.json"))
    states = [json.loads(f.read_text()) for f in files]
    spec = _spec(tiny_data, sft_data, 0.2, 0.8)
    changed = _run(2, spec, tmp_path / "phase", "--workers", "1", "--resume",
                   str(mix_reference["out"] / "state-rank*.json"), "--fresh", "0")  # fmt: skip
    expected, loader = _in_process(tiny_data, sft_data, 0.2, 0.8, states)
    got = _global(changed["resumed-pass0"])
    assert len(got) > 100 and np.array_equal(got, expected[: len(got)])
    for r in range(2):
        assert (tmp_path / "phase" / f"phase-rank{r}.txt").read_text() == loader.phase_change
    assert "web 0.600 -> 0.200, sft 0.400 -> 0.800" in (loader.phase_change or "")
