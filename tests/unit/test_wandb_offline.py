"""The offline `.wandb` reader against files written by the real wandb (offline mode, subprocess)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.conftest import test_env as child_env
from tests.wandb_offline import (
    BLOCK_SIZE,
    WandbFileError,
    find_offline_run,
    find_offline_runs,
    read_config,
    read_history,
    read_records,
    read_run_info,
)

# Run in a child process: wandb.init installs hooks and global state that must not leak into the
# test process. Each "start:n" argument is one wandb.init ... finish segment (a resume after the
# first when resume is set) logging steps start..start+n-1; every logged value is a pure function
# of the step so the test can recompute it.
WRITER = """
import sys, wandb
out, run_id, resume, *segments = sys.argv[1:]
for seg in segments:
    start, n = map(int, seg.split(":"))
    run = wandb.init(
        project="pretrain-test", dir=out, mode="offline", id=run_id, resume=resume or None,
        config={"lr": 3e-4, "model": {"n_layer": 2, "d_model": 64}, "seed": start},
    )
    for s in range(start, start + n):
        run.log(
            {"train/loss": 1.0 / (s + 1), "tokens": s * 4096, "nested": {"grad_norm": s / 7},
             "note": "x" * 40000 if s == start + 3 else f"s{s}"},
            step=s,
        )
    run.config.update({"finished_at": start + n})
    run.finish()
"""


def expected_row(s: int, start: int) -> dict[str, object]:
    return {
        "train/loss": 1.0 / (s + 1),
        "tokens": s * 4096,
        "nested": {"grad_norm": s / 7},
        "note": "x" * 40000 if s == start + 3 else f"s{s}",
        "_step": s,
    }


def write_run(out: Path, run_id: str, *segments: str, resume: str = "") -> None:
    env = child_env(WANDB_CONFIG_DIR=str(out / "cfg"), WANDB_CACHE_DIR=str(out / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(out), run_id, resume, *segments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def user_keys(row: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in row.items() if k not in ("_runtime", "_timestamp")}


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wandb_one")
    write_run(out, "abc123xy", "0:100")
    return out


def test_history_config_and_info_match_what_was_logged(one_run: Path) -> None:
    path = find_offline_run(one_run)
    assert path.name == "run-abc123xy.wandb" and path.parent.name.startswith("offline-run-")
    # A 40 000-character value cannot fit one 32 KiB block: the file must exercise split records.
    assert path.stat().st_size > BLOCK_SIZE

    rows = read_history(one_run)
    assert [user_keys(r) for r in rows] == [expected_row(s, 0) for s in range(100)]
    assert all(isinstance(r["_runtime"], float) and r["_timestamp"] > 1e9 for r in rows)

    assert read_config(one_run) == {
        "lr": 3e-4,
        "model": {"n_layer": 2, "d_model": 64},
        "seed": 0,
        "finished_at": 100,
    }
    assert "_wandb" in read_config(one_run, include_wandb=True)

    info = read_run_info(path)
    assert (info["run_id"], info["project"]) == ("abc123xy", "pretrain-test")
    assert info["resume"] is False and info["files"] == [str(path)]

    # The three ways of naming the run agree: the file, its run directory, the wandb= dir.
    assert read_history(path) == read_history(path.parent) == rows


def test_resume_reads_every_segment_in_order(tmp_path: Path) -> None:
    write_run(tmp_path, "resum001", "0:10")
    # A new process resumes twice in a row. When two segments start within the same second,
    # wandb names the second directory offline-run-<time>-<id>-1 (see the next test).
    write_run(tmp_path, "resum001", "10:5", "15:5", resume="allow")

    files = find_offline_runs(tmp_path)
    assert len(files) == 3 and {f.name for f in files} == {"run-resum001.wandb"}
    assert find_offline_run(tmp_path) == files[-1]

    rows = read_history(tmp_path)
    starts = {s: 0 if s < 10 else (10 if s < 15 else 15) for s in range(20)}
    assert [user_keys(r) for r in rows] == [expected_row(s, starts[s]) for s in range(20)]
    # Each file alone holds only its own segment.
    assert [r["_step"] for r in read_history(files[1])] == list(range(10, 15))

    info = read_run_info(tmp_path)
    assert info["run_id"] == "resum001"
    assert [s["resume"] for s in info["segments"]] == [False, True, True]
    assert [s["run_id"] for s in info["segments"]] == ["resum001"] * 3
    assert info["files"] == [str(f) for f in files]
    # Later config updates win; the last segment's values are the config now.
    assert read_config(tmp_path)["seed"] == 15 and read_config(tmp_path)["finished_at"] == 20


def test_same_second_directories_sort_in_creation_order(tmp_path: Path) -> None:
    # wandb 0.31 appends -1, -2, ... to a run directory whose offline-run-<time>-<id> name is
    # taken (seen with quick successive resumes); -10 must come after -9, not after the bare name.
    names = ["offline-run-20261122_113426-ab-c"] + [
        f"offline-run-20261122_113426-ab-c-{i}" for i in range(1, 12)
    ]
    names += ["offline-run-20261122_113425-ab-c", "offline-run-20261122_113427-ab-c"]
    for name in names:
        (tmp_path / "wandb" / name).mkdir(parents=True)
        (tmp_path / "wandb" / name / "run-ab-c.wandb").touch()
    (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / names[-1])
    found = [f.parent.name for f in find_offline_runs(tmp_path / "wandb")]
    assert found == [names[-2], *names[:-2], names[-1]]


def test_several_run_ids_in_one_dir_and_non_finite_values(tmp_path: Path, one_run: Path) -> None:
    shutil.copytree(one_run / "wandb", tmp_path / "wandb")
    script = (
        "import sys, wandb\n"
        "r = wandb.init(project='p', dir=sys.argv[1], mode='offline', id='other001')\n"
        "r.log({'nan': float('nan'), 'inf': float('inf'), 'ninf': -float('inf'), 'b': True})\n"
        "r.log({'b': False})\n"
        "r.finish()\n"
    )
    env = child_env(WANDB_CONFIG_DIR=str(tmp_path / "cfg"), WANDB_CACHE_DIR=str(tmp_path / "c"))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    with pytest.raises(ValueError, match="different ids"):
        read_history(tmp_path)
    (only,) = find_offline_runs(tmp_path, run_id="other001")
    first, second = read_history(only)
    assert math.isnan(first["nan"]) and first["inf"] == math.inf and first["ninf"] == -math.inf
    assert (first["b"], first["_step"]) == (True, 0)
    assert (second["b"], second["_step"]) == (False, 1)


def test_corruption_is_detected_and_a_cut_tail_is_dropped(one_run: Path, tmp_path: Path) -> None:
    data = find_offline_run(one_run).read_bytes()
    n_records = len(read_records(find_offline_run(one_run)))

    bad = tmp_path / "flipped.wandb"
    flipped = bytearray(data)
    flipped[7 + 7] ^= 0x01  # first payload byte of the first chunk (after file + chunk header)
    bad.write_bytes(bytes(flipped))
    with pytest.raises(WandbFileError, match="CRC mismatch"):
        read_records(bad)

    # A writer killed mid-record leaves a partial chunk at the end: everything before it reads.
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[:-5])
    assert len(read_records(cut)) == n_records - 1

    notwandb = tmp_path / "not.wandb"
    notwandb.write_bytes(b"hello world, not a run")
    with pytest.raises(WandbFileError, match="not a W&B run file"):
        read_records(notwandb)
