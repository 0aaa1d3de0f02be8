"""One rank's failure fails the whole job fast, with the failing rank's message once.

Real torchrun jobs of 2 ranks where only rank 1 fails, three ways: its shards are corrupt (a
node whose local copy of the data went bad), its checkpoint writes fail (a file-size limit on
that process alone: the same OSError path as a full disk), or its forward raises. Each rank's
exit time is recorded by `rank_wrapper.sh`; every rank must be gone within 30 s of the first
and exit non-zero, the failing rank's error must be printed once, and no other rank may add a
traceback of its own (gloo's "Connection closed by peer" and the like)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import checkpoint
from tests.conftest import REPO, test_env

WRAPPER = Path(__file__).with_name("rank_wrapper.sh")
DEADLINE_S = 30


def job(
    data: Path, run_dir: Path, tmp: Path, *, fail_setup: str = "", fail_args: str = "",
    fail_env: str = "", extra: tuple[str, ...] = (),
) -> tuple[subprocess.CompletedProcess[str], list[tuple[int, int, float]], list[str]]:  # fmt: skip
    """Run a 2-rank job in which rank 1 gets `fail_*`; (torchrun's result, per-rank exits,
    per-rank output: what each rank printed, without torchrun's own report)."""
    exits, logs = tmp / "exits.log", tmp / "logs"
    setup = "; ".join(
        part for part in (fail_setup, f"export {fail_env}" if fail_env else "") if part
    )
    env = test_env(
        PYTHON=sys.executable, FAIL_RANK="1", FAIL_SETUP=setup, FAIL_ARGS=fail_args,
        EXIT_LOG=str(exits),
    )  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        f"--log-dir={logs}", "--redirects=3", "--no-python", "bash", str(WRAPPER), "experiment=debug", f"data.dir={data}",
        f"run.dir={run_dir}", "strategy=ddp", "train.max_steps=12", "checkpoint.every=6",
        # Far beyond the deadline: a job that ends in time did not wait for a timeout.
        "dist.timeout_s=300", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    rows = [line.split() for line in exits.read_text().splitlines()] if exits.exists() else []
    outputs = [
        "".join(p.read_text() for p in sorted(logs.glob(f"*/attempt_0/{r}/std*.log")))
        for r in range(2)
    ]
    return proc, [(int(r), int(c), float(t)) for r, c, t in rows], outputs


def assert_failed_fast(
    proc: subprocess.CompletedProcess[str], exits: list, outputs: list[str], message: str
) -> str:
    """The checks every failure shares; returns what the ranks printed, together."""
    out = "".join(outputs)
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(r for r, _, _ in exits) == [0, 1], (exits, out[-3000:])
    assert all(code != 0 for _, code, _ in exits), exits
    times = [t for _, _, t in exits]
    assert max(times) - min(times) < DEADLINE_S, (exits, out[-3000:])
    assert out.count(message) == 1 and message in outputs[1], out[-5000:]
    # The other rank adds nothing of its own (at most one line that says why it stopped).
    assert "Traceback" not in outputs[0] and "error" not in outputs[0].lower(), outputs[0]
    assert "Connection closed by peer" not in out, out[-5000:]
    return out


@pytest.mark.timeout(500)
def test_corrupt_shards_on_one_rank(tiny_data: Path, tmp_path: Path) -> None:
    # Rank 1 reads its own copy of the data dir, in which every train shard's first tar header
    # is damaged (the manifest still matches: sizes and tokenizer are unchanged).
    bad = tmp_path / "bad_copy"
    shutil.copytree(tiny_data, bad)
    for shard in sorted((bad / "train").glob("*.tar")):
        with open(shard, "r+b") as f:
            f.seek(148)  # the header checksum field of the first member
            f.write(b"XXXXXX")
    proc, exits, outputs = job(tiny_data, tmp_path / "run", tmp_path, fail_args=f"data.dir={bad}")
    out = assert_failed_fast(proc, exits, outputs, "error: shard train/")
    assert "corrupt" in out and "Traceback" not in out, out[-5000:]
    assert checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints") == []


@pytest.mark.timeout(500)
def test_checkpoint_write_failure_on_one_rank(tiny_data: Path, tmp_path: Path) -> None:
    # 64 KiB per file for rank 1 only: its first checkpoint's shard cannot be written (EFBIG,
    # SIGXFSZ ignored so that the write fails instead of killing the process).
    proc, exits, outputs = job(
        tiny_data, tmp_path / "run", tmp_path, fail_setup="trap '' XFSZ; ulimit -f 64"
    )
    out = assert_failed_fast(proc, exits, outputs, "error: saving checkpoint")
    assert "failed on rank 1" in out and "Traceback" not in out, out[-5000:]
    root = tmp_path / "run" / "checkpoints"
    # Never complete, never `latest`, no leftovers.
    assert checkpoint.list_checkpoints(root) == [] and not (root / "latest").exists()
    assert not list(root.glob(".tmp-*"))


@pytest.mark.timeout(500)
def test_background_checkpoint_write_failure_on_one_rank(tiny_data: Path, tmp_path: Path) -> None:
    # The same file-size limit on rank 1, with checkpoints written in the background: the
    # failure is reported as a synchronous one is, by the rank it happened on, and the
    # checkpoint never becomes complete.
    proc, exits, outputs = job(
        tiny_data, tmp_path / "run", tmp_path, fail_setup="trap '' XFSZ; ulimit -f 64",
        extra=("checkpoint.async_save=true",),
    )  # fmt: skip
    out = assert_failed_fast(proc, exits, outputs, "error: saving checkpoint")
    assert "failed on rank 1" in out and "Traceback" not in out, out[-5000:]
    root = tmp_path / "run" / "checkpoints"
    assert checkpoint.list_checkpoints(root) == [] and not (root / "latest").exists()
    assert not list(root.glob(".tmp-*"))


@pytest.mark.timeout(500)
def test_exception_in_one_ranks_forward(tiny_data: Path, tmp_path: Path) -> None:
    proc, exits, outputs = job(
        tiny_data, tmp_path / "run", tmp_path,
        fail_env="PRETRAIN_FAILPOINT=train.micro_step:raise",
    )  # fmt: skip
    # A bug, not an expected error: the failing rank's traceback is its message, shown once.
    assert_failed_fast(proc, exits, outputs, "FailpointError: failpoint train.micro_step")


@pytest.mark.timeout(500)
def test_a_job_that_succeeds_is_not_a_failure(tiny_data: Path, tmp_path: Path) -> None:
    """The watcher must not mistake a rank that finishes first for a failed one."""
    proc, exits, _ = job(tiny_data, tmp_path / "run", tmp_path, extra=("train.max_steps=6",))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert [c for _, c, _ in exits] == [0, 0], exits
