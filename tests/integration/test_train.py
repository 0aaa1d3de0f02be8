"""End-to-end runs of `python -m pretrain.train` on the CPU: resume, crashes, errors, W&B."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from pretrain.model import GPT, GPTConfig
from tests.conftest import REPO, test_env
from tests.wandb_offline import find_offline_runs, read_history, read_run_info


def train_cli(
    data: Path, run_dir: Path, *overrides: str, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        "experiment=debug",
        f"data.dir={data}",
        f"run.dir={run_dir}",
        *overrides,
    ]
    return subprocess.run(
        cmd, cwd=REPO, env=env or test_env(), capture_output=True, text=True, timeout=300, **kw
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = checkpoint.load_model_weights(a), checkpoint.load_model_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.timeout(300)
def test_resume_is_exact(tiny_data: Path, tmp_path: Path) -> None:
    """2N steps in one run == N steps, process exit, resume to 2N: every loss and the final
    weights are bit-identical (CPU, fp32), with dropout and DataLoader workers on."""
    common = (
        "train.max_steps=12",
        "model.dropout=0.1",
        "data.num_workers=2",
        "checkpoint.every=100",
    )
    ok(train_cli(tiny_data, tmp_path / "straight", *common))
    ok(train_cli(tiny_data, tmp_path / "split", *common, "train.stop_at_step=6"))
    assert max(losses(tmp_path / "split")) == 6
    out = ok(train_cli(tiny_data, tmp_path / "split", *common))
    assert "resumed from" in out.stdout
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(straight) == list(range(1, 13)) == sorted(split)
    for step in straight:
        assert straight[step] == split[step], (step, straight[step], split[step])
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("point", ["checkpoint.after_tensors", "checkpoint.before_latest"])
def test_sigkill_during_save_keeps_previous_checkpoint(
    tiny_data: Path,
    tmp_path: Path,
    point: str,
) -> None:
    run = tmp_path / "run"
    ok(train_cli(tiny_data, run, "train.max_steps=4", "checkpoint.every=4"))
    proc = train_cli(
        tiny_data,
        run,
        "train.max_steps=8",
        "checkpoint.every=4",
        env=test_env(PRETRAIN_FAILPOINT=point),
    )
    assert proc.returncode == -signal.SIGKILL
    found = checkpoint.find_resume(run / "checkpoints", "auto")
    if point == "checkpoint.after_tensors":
        # Killed before the rename: step 8 never appeared, step 4 is what resumes.
        assert found is not None and found.name == "step_0000004"
        assert not (run / "checkpoints" / "step_0000008").exists()
    else:
        # Killed after the rename but before `latest` moved: step 8 is complete and wins.
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
        assert found is not None and found.name == "step_0000008"
    out = ok(train_cli(tiny_data, run, "train.max_steps=10", "checkpoint.every=4"))
    assert f"resumed from {found}" in out.stdout


# fp32 unit roundoff: the relative error of one rounding.
U32 = 2.0**-24


@pytest.mark.timeout(200)
def test_accumulation_matches_larger_micro_batch(tiny_data: Path, tmp_path: Path) -> None:
    """micro 4 x accumulation 2 computes the same optimizer steps as micro 8 x 1.

    Tolerance (fp32, the debug model: n_embd 64, MLP 256, 512 tokens per step): both runs do
    the same arithmetic in another order. The matmuls run over 4 or 8 rows, so the library may
    block them differently (oneDNN picks kernels by shape and by CPU), and the step's loss is
    one mean over 512 tokens or two means over 256. A sum of n fp32 terms in another order
    differs by at most n·u relative (u = 2^-24); the longest reduction here is the 512-token
    mean, so every loss agrees within 512·u ≈ 3e-5 relative. Weights are compared through the
    function they compute, the loss on fixed batches, with the same bound: elementwise they can
    differ more, since AdamW divides each gradient by its running RMS and an element whose
    gradient is at the rounding-noise level moves by up to lr either way."""
    a = ok(
        train_cli(
            tiny_data,
            tmp_path / "a",
            "train.micro_batch=4",
            "train.global_batch_tokens=512",
            "train.max_steps=6",
        )
    )
    b = ok(
        train_cli(
            tiny_data,
            tmp_path / "b",
            "train.micro_batch=8",
            "train.global_batch_tokens=512",
            "train.max_steps=6",
        )
    )
    assert "accum 2" in a.stdout and "accum 1" in b.stdout
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys() == set(range(1, 7))
    tol = 512 * U32
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=tol, abs=0)
    models = []
    for run in ("a", "b"):
        cfg = checkpoint.read_config(tmp_path / run)
        model = GPT(GPTConfig(**cfg["model"]))
        model.load_state_dict(checkpoint.load_model_weights(tmp_path / run))
        models.append(model.eval())
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, models[0].cfg.vocab_size, (8, 65), generator=g)
    with torch.no_grad():
        loss_a, loss_b = (float(m(seq[:, :-1], seq[:, 1:])[1]) for m in models)
    assert loss_a == pytest.approx(loss_b, rel=tol, abs=0)


@pytest.mark.timeout(200)
def test_metrics_reach_wandb_offline_files_and_resume_continues_the_run(
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    wb = ("logging.wandb=true", "logging.wandb_mode=offline", "checkpoint.every=100")
    ok(train_cli(tiny_data, run, "train.max_steps=10", "train.stop_at_step=5", *wb))
    ok(train_cli(tiny_data, run, "train.max_steps=10", *wb))
    files = find_offline_runs(run / "wandb")
    assert len(files) == 2, files
    ids = {read_run_info(f)["run_id"] for f in files}
    assert len(ids) == 1, ids
    history = [row for f in files for row in read_history(f)]
    by_step = {int(r["_step"]): r for r in history if "loss" in r}
    jsonl = losses(run)
    assert sorted(by_step) == sorted(jsonl) == list(range(1, 11))
    for step, loss in jsonl.items():
        assert by_step[step]["loss"] == pytest.approx(loss, rel=1e-6)
        assert by_step[step]["tokens_per_s"] > 0


@pytest.mark.timeout(200)
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(train_cli(tiny_data, run, "train.max_steps=2", "checkpoint.every=2"))
    # A learning rate of 1e6 without clipping blows the weights up: a real NaN, not a mock.
    proc = train_cli(
        tiny_data,
        run,
        "train.max_steps=40",
        "checkpoint.every=1",
        "optim.lr=1e6",
        "optim.grad_clip=0",
        "schedule.name=constant",
        "schedule.warmup_steps=0",
        # Workers ignore SIGTERM; the run must still exit (not hang) on an error.
        "data.num_workers=2",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "NaN/inf" in proc.stderr and "last good checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    for ckpt in checkpoint.list_checkpoints(run / "checkpoints"):
        weights = checkpoint.load_model_weights(ckpt)
        assert all(torch.isfinite(w).all() for w in weights.values()), ckpt


def _limit_file_size() -> None:
    # A file-size limit makes the checkpoint's tensor file fail to write (EFBIG) the way a
    # full disk fails it (ENOSPC): a real OSError inside the save. SIGXFSZ would kill us first.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


@pytest.mark.timeout(200)
def test_failed_save_reports_and_keeps_previous(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(train_cli(tiny_data, run, "train.max_steps=2", "checkpoint.every=2"))
    proc = train_cli(
        tiny_data, run, "train.max_steps=4", "checkpoint.every=4", preexec_fn=_limit_file_size
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "saving checkpoint" in proc.stderr and "is intact" in proc.stderr
    assert "step_0000002" in proc.stderr
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step_0000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, tmp_path / "run", "train.max_stepz=3")
    assert proc.returncode == 2
    assert "unknown config key 'train.max_stepz'" in proc.stderr
    assert "Did you mean 'train.max_steps'" in proc.stderr and "micro_batch" in proc.stderr


def test_wrong_type_and_missing_data_are_clear(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, tmp_path / "run", "train.max_steps=abc")
    assert proc.returncode != 0 and "max_steps" in proc.stderr and "abc" in proc.stderr
    proc = train_cli(tmp_path / "nowhere", tmp_path / "run")
    assert proc.returncode == 1
    assert "holds no prepared data" in proc.stderr and "pretrain.prepare" in proc.stderr


def test_indivisible_global_batch_is_clear(tiny_data: Path, tmp_path: Path) -> None:
    proc = train_cli(tiny_data, tmp_path / "run", "train.global_batch_tokens=1000")
    assert proc.returncode == 1
    assert "global_batch_tokens=1000 is not a multiple of" in proc.stderr


@pytest.mark.timeout(200)
def test_config_and_sample(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(train_cli(tiny_data, run, "train.max_steps=3", "data.num_workers=1"))
    saved = (run / "config.yaml").read_text()
    assert "max_steps: 3" in saved and "vocab_size" in saved
    rows = read_metrics(run)
    assert {"step", "loss", "lr", "tokens_per_s"} <= rows[0].keys()
    json.dumps(rows)
    out = ok(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pretrain.sample",
                f"checkpoint={run}",
                "prompt=def",
                "max_new_tokens=20",
                "num_samples=1",
            ],
            cwd=REPO,
            env=test_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    )
    assert "----- sample 0 -----" in out.stdout
    assert out.stdout.split("-----\n", 1)[1].startswith("def")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_for_requeue(
    tiny_data: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """The signal goes to the whole process group, DataLoader workers included, as Slurm
    delivers it: the step finishes, a checkpoint is saved, the exit status is 75."""
    import os
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.train", "experiment=debug", f"data.dir={tiny_data}",
           f"run.dir={run}", "train.max_steps=100000", "checkpoint.every=100000",
           "data.num_workers=2"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=test_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3
    ):
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "preempted" in out
    saved = checkpoint.find_resume(run / "checkpoints", "auto")
    assert saved is not None
    step = json.loads((saved / "train_state.json").read_text())["step"]
    assert step >= 3 and max(losses(run)) == step
    out2 = ok(train_cli(tiny_data, run, f"train.max_steps={step + 2}"))
    assert f"(step {step})" in out2.stdout
    assert sorted(losses(run)) == list(range(1, step + 3))


@pytest.mark.timeout(200)
def test_one_timeline_per_run_dir(tiny_data: Path, tmp_path: Path) -> None:
    """resume=none over existing checkpoints is refused; resuming from an older checkpoint
    moves the newer ones aside, so neither `auto` nor pruning mixes two timelines."""
    run = tmp_path / "run"
    ok(train_cli(tiny_data, run, "train.max_steps=4", "checkpoint.every=2"))
    proc = train_cli(tiny_data, run, "train.max_steps=4", "checkpoint.resume=none")
    assert proc.returncode == 1 and "already holds checkpoints" in proc.stderr
    older = run / "checkpoints" / "step_0000002"
    ok(train_cli(tiny_data, run, "train.max_steps=6", "checkpoint.every=3",
                 f"checkpoint.resume={older}"))  # fmt: skip
    assert (run / "checkpoints" / "superseded-2" / "step_0000004").is_dir()
    names = [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")]
    assert names == ["step_0000003", "step_0000006"]  # debug keeps the last 2
    found = checkpoint.find_resume(run / "checkpoints", "auto")
    assert found is not None and found.name == "step_0000006"
