"""The data order and integrity through `python -m pretrain.train`, on real processes: the same
global batch at any world size and accumulation, elastic resume on the same global order,
corrupt shards stopped with one message, fine-tuning data trained on its responses."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import TokenLoader, read_manifest
from pretrain.metrics import read_metrics
from tests.conftest import REPO, test_env, torchrun
from tests.data_fixtures import flip_byte_in_member, replace_member_same_size

# 8 windows of 64 tokens per optimizer step on every geometry below; 16 partitions: 1, 2 and 4
# ranks x 1 or 2 workers divide it.
STEPS, SAVE_AT = 8, 4
COMMON = ("experiment=debug", "strategy=ddp", "precision=fp32", "train.global_batch_tokens=512",
          f"train.max_steps={STEPS}", f"checkpoint.every={SAVE_AT}", "data.partitions=16",
          "logging.every=1")  # fmt: skip


def cli(data: Path, run: Path, *extra: str) -> list[str]:
    return ["-m", "pretrain.train", *COMMON, f"data.dir={data}", f"run.dir={run}", *extra]


def run_cli(nproc: int, data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    if nproc > 1:
        return torchrun(nproc, cli(data, run, *extra), timeout=400)
    proc = subprocess.run(
        [sys.executable, *cli(data, run, *extra)],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def assert_close_losses(a: dict[int, float], b: dict[int, float], steps: range) -> None:
    # fp32: the same windows in every step, split otherwise over micro-batches and ranks, so
    # only the summation order differs: of a loss mean over 512 targets, of matmul reductions
    # (64-256 terms) and of the gradient sum over 1-8 micro-batches (all-reduce or
    # accumulation). That is ~1e-7 relative per step (sqrt(n) x 6e-8), compounding a little
    # through the optimizer over 8 steps; 1e-5 relative bounds it with room to spare, while a
    # different global batch differs by ~1e-2 (the old order: 9.9e-3 at 1 vs 2 ranks).
    assert sorted(a) == sorted(b) == list(steps)
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a[s], b[s])


@pytest.mark.timeout(900)
def test_same_global_batch_at_any_world_size_and_accumulation_and_elastic_resume(
    tiny_data: Path, tmp_path: Path
) -> None:
    two = tmp_path / "ranks2"
    p2 = run_cli(2, tiny_data, two, "train.micro_batch=4")  # accumulation 1 per rank
    assert "strategy ddp x2" in p2.stdout and "accum 1" in p2.stdout
    ref = losses(two)
    geometries = {
        "accum2": (1, "train.micro_batch=4", "data.num_workers=2"),
        "accum4": (1, "train.micro_batch=2", "data.num_workers=1"),
        "ranks4": (4, "train.micro_batch=2", "data.num_workers=1"),
    }
    for name, (nproc, *extra) in geometries.items():
        run_cli(nproc, tiny_data, tmp_path / name, *extra)
        assert_close_losses(losses(tmp_path / name), ref, range(1, STEPS + 1))
    # A different global order is visibly different: the control that makes 1e-5 meaningful.
    run_cli(1, tiny_data, tmp_path / "seed", "train.micro_batch=4", "data.seed=99")
    other = losses(tmp_path / "seed")
    assert max(abs(other[s] - ref[s]) / ref[s] for s in range(2, STEPS + 1)) > 1e-3

    # Elastic resume of the 2-rank run's step-4 checkpoint on 1 and on 4 ranks: the steps after
    # it see the windows the uninterrupted run saw, so their losses are the uninterrupted run's.
    ckpt = two / "checkpoints" / f"step_{SAVE_AT:07d}"
    for nproc, micro in ((1, 4), (4, 2)):
        run = tmp_path / f"elastic{nproc}"
        out = run_cli(nproc, tiny_data, run, f"train.micro_batch={micro}",
                      f"checkpoint.resume={ckpt}")  # fmt: skip
        assert f"resumed from {ckpt}" in out.stdout
        got = losses(run)
        assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
        assert_close_losses(got, {s: ref[s] for s in got}, range(SAVE_AT + 1, STEPS + 1))


def _tree_hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize("damage, workers", [("flip", 2), ("swap", 0)])
def test_a_corrupt_shard_stops_the_run_with_one_message_and_keeps_the_checkpoint(
    tiny_data: Path, tmp_path: Path, damage: str, workers: int
) -> None:
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    run = tmp_path / "run"
    extra = ("train.micro_batch=4", f"data.num_workers={workers}", "train.eval_batches=0")
    run_cli(1, data, run, *extra, f"train.max_steps={SAVE_AT}")
    ckpt_before = _tree_hashes(run / "checkpoints")
    # The shard that the first batch after the checkpoint reads (the run's geometry: 1 rank,
    # seed 1234, 16 partitions): every read is checked, so the resumed run must stop at once.
    loader = TokenLoader(data, "train", 64, 4, seed=1234, partitions=16)
    loader.load_state_dict(
        json.loads((run / "checkpoints" / f"step_{SAVE_AT:07d}" / "train_state.json").read_text())[
            "loader"
        ]
    )
    first_after = _first_shard_at(loader)
    victim = data / first_after
    size = victim.stat().st_size
    if damage == "flip":
        member = flip_byte_in_member(victim)
    else:
        others = [
            data / s.name for s in read_manifest(data).shards("train") if s.name != first_after
        ]
        member = replace_member_same_size(victim, others)
    assert victim.stat().st_size == size and member
    expected = next(s.sha256 for s in read_manifest(data).shards("train") if s.name == first_after)
    found = hashlib.sha256(victim.read_bytes()).hexdigest()

    proc = subprocess.run(
        [sys.executable, *cli(data, run, *extra)],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert f"shard {first_after}" in err and expected in err and found in err
    assert "re-copy the data dir" in err and "pretrain.prepare" in err
    assert "Traceback" not in err and "Caught" not in err and err.count("is corrupt") == 1
    # Nothing was trained after the checkpoint, and it is untouched.
    assert max(losses(run)) == SAVE_AT
    assert _tree_hashes(run / "checkpoints") == ckpt_before


def _first_shard_at(loader: TokenLoader) -> str:
    """The shard of the first window `loader` reads from its position (one rank, 1 reader)."""
    q = loader.state_dict()["position"]
    _, shard, _ = loader._spec.locate(np.array([q]))
    return loader.manifest.shards("train")[int(shard[0])].name


@pytest.mark.timeout(600)
def test_fine_tuning_data_trains_and_resumes_exactly(sft_data: Path, tmp_path: Path) -> None:
    args = ("train.micro_batch=4", "data.num_workers=2", "data.partitions=8")
    run_cli(1, sft_data, tmp_path / "straight", *args)
    run_cli(1, sft_data, tmp_path / "split", *args, f"train.stop_at_step={SAVE_AT}")
    out = run_cli(1, sft_data, tmp_path / "split", *args)
    assert "resumed from" in out.stdout
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s] == b[s] for s in a), (a, b)  # the same code path: bit-identical
    assert all(0 < v < 10 for v in a.values())
