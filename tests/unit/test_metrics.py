"""Which offline W&B record a run continues, and the command that uploads it."""

from __future__ import annotations

import shlex
from pathlib import Path

from pretrain.metrics import offline_records, sync_command


def segment(wandb_dir: Path, name: str, run_id: str) -> Path:
    (wandb_dir / name).mkdir(parents=True)
    f = wandb_dir / name / f"run-{run_id}.wandb"
    f.write_bytes(b":W&B")
    return f


def test_offline_records_are_this_runs_unsynced_offline_segments(tmp_path: Path) -> None:
    wb = tmp_path / "wandb"
    assert offline_records(wb, "abc") == []  # no wandb directory yet
    first = segment(wb, "offline-run-20261201_100000-abc", "abc")
    second = segment(wb, "offline-run-20261201_100000-abc-1", "abc")  # same-second resume
    segment(wb, "run-20261201_090000-abc", "abc")  # an online segment: already on the server
    segment(wb, "offline-run-20261201_100000-other", "other")  # another run's record
    assert offline_records(wb, "abc") == [first, second]
    # `wandb sync` marks what it uploaded: an uploaded record is no reason to stay offline.
    first.with_name(first.name + ".synced").touch()
    second.with_name(second.name + ".synced").touch()
    assert offline_records(wb, "abc") == []


def test_sync_command_is_absolute_and_quoted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cmd = sync_command(Path("runs/my run/wandb"))
    assert shlex.split(cmd) == ["wandb", "sync", str(tmp_path / "runs" / "my run" / "wandb")]
