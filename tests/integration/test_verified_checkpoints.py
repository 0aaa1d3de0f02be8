"""Checkpoints are verified wherever they are read: a damaged newest checkpoint (bytes changed
in place, a truncated file, a missing .metadata) is skipped by checkpoint.resume=auto with one
line, moved aside, and the run continues from the newest intact one; a named damaged one stops
the run; export refuses it in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from tests.conftest import REPO, test_env


def train(data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pretrain.train", "experiment=debug", f"data.dir={data}",
           f"run.dir={run}", "checkpoint.every=2", "checkpoint.keep_last=2", *extra]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300
    )


def damage(ckpt: Path, how: str) -> None:
    tensors = next((ckpt / "dcp").glob("*.distcp"))
    if how == "flip":  # 4 KB in the middle, size unchanged
        data = bytearray(tensors.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 4096] = bytes(b ^ 0x5A for b in data[mid : mid + 4096])
        tensors.write_bytes(bytes(data))
    elif how == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    else:
        (ckpt / "dcp" / ".metadata").unlink()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["flip", "truncate", "metadata"])
def test_a_damaged_checkpoint_is_never_trained_on(tiny_data: Path, tmp_path: Path, how: str):
    run = tmp_path / "run"
    proc = train(tiny_data, run, "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step4 = run / "checkpoints" / "step_0000004"
    damage(step4, how)

    # export (any reader) refuses it in one line
    out = subprocess.run(
        [sys.executable, "-m", "pretrain.export", str(step4), str(tmp_path / "w.safetensors")],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and "is damaged" in out.stderr, out.stderr[-2000:]

    # a named resume stops; auto skips it, moves it aside and goes on from step 2
    named = train(tiny_data, run, "train.max_steps=6", f"checkpoint.resume={step4}")
    assert named.returncode == 1 and "is damaged" in named.stderr, named.stderr[-2000:]
    auto = train(tiny_data, run, "train.max_steps=6")
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert f"checkpoint {step4} is damaged" in auto.stdout and "(step 2)" in auto.stdout
    assert (run / "checkpoints" / "damaged-step_0000004").is_dir()
    names = [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")]
    assert names == ["step_0000004", "step_0000006"]  # written again from step 2, intact
    assert checkpoint.verify(run / "checkpoints" / "step_0000006") is None
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 6 and max(losses) < 10  # nothing trained on damaged weights
