"""Which offline W&B record a run continues, and the command that uploads it; the loss curve
written whole or not at all."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from pretrain.metrics import offline_records, sync_command
from tests.conftest import REPO, test_env


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


# A file-size limit below a PNG's size: the write fails (EFBIG) as on a full disk.
DRAW_LIMITED = """
import resource, signal, sys
from pathlib import Path
from pretrain.metrics import plot_loss_curve
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
plot_loss_curve(Path(sys.argv[1]))
"""


def test_the_loss_curve_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 6.0 - s / 10} for s in range(1, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "loss.png").write_bytes(b"the previous curve")
    failed = subprocess.run(
        [sys.executable, "-c", DRAW_LIMITED, str(tmp_path)],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode != 0 and "File too large" in failed.stderr, failed.stderr[-2000:]
    assert (tmp_path / "loss.png").read_bytes() == b"the previous curve"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
    done = subprocess.run(
        [sys.executable, "-c", DRAW_LIMITED.replace("4096, 4096", "10**8, 10**8"), str(tmp_path)],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_a_row_cut_off_by_a_kill_is_not_a_row(tmp_path: Path) -> None:
    """A kill in the middle of a row's write leaves half a line at the end of metrics.jsonl:
    readers skip it, and a resume drops it with the rows it re-does."""
    from pretrain.metrics import _drop_steps_after, _last_step, read_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert read_metrics(tmp_path) == rows and _last_step(path) == 3
    _drop_steps_after(path, 2)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
