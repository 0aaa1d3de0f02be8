"""End-to-end runs of `python -m pretrain.train` on the CPU: resume, crashes, errors, W&B."""

from __future__ import annotations

import itertools
import json
import math
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
from tests.conftest import REPO, test_env, torchrun
from tests.wandb_offline import find_offline_runs, read_history, read_run_info
from tests.wandb_offline import read_config as read_wandb_config


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
def test_wandb_rewinds_to_the_resumed_checkpoint_as_metrics_jsonl_does(
    tiny_data: Path, tmp_path: Path
) -> None:
    """A run resumed from an older checkpoint re-does steps W&B has logged: its offline record
    rewinds to the checkpoint, so W&B holds this run's values of those steps (timings differ
    between the two runs), the ones metrics.jsonl holds."""
    run = tmp_path / "run"
    wb = ("logging.wandb=true", "logging.wandb_mode=offline", "train.max_steps=6")
    ok(train_cli(tiny_data, run, "checkpoint.every=3", *wb))
    first = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    older = run / "checkpoints" / "step_0000003"
    out = ok(train_cli(tiny_data, run, f"checkpoint.resume={older}", *wb)).stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith("W&B:")]
    assert "rewinds to step 3 in its offline record" in line and "steps 4-6" in line, line

    info = read_run_info(run / "wandb")
    assert [s["rewound_to"] for s in info["segments"]] == [None, 3]
    jsonl = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert sorted(jsonl) == list(range(1, 7))
    rows = [r for r in read_history(run / "wandb") if "loss" in r]
    assert [r["_step"] for r in rows] == list(range(1, 7))  # each step once, as uploaded
    for r in rows:
        assert r["step_time_s"] == jsonl[r["_step"]]["step_time_s"], r["_step"]
    # The first run's values of the re-done steps were others: W&B kept them before.
    assert any(first[s]["step_time_s"] != jsonl[s]["step_time_s"] for s in (4, 5, 6))
    # A resume that re-does nothing continues the run without rewinding it.
    out = ok(train_cli(tiny_data, run, *wb[:2], "train.max_steps=8")).stdout
    assert "W&B:" not in out
    assert [s["rewound_to"] for s in read_run_info(run / "wandb")["segments"]] == [None, 3, None]
    rows = [r for r in read_history(run / "wandb") if "loss" in r]
    assert [r["_step"] for r in rows] == list(range(1, 9))


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
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_preemption_signal_saves_and_exits_for_requeue(
    tiny_data: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """The signal goes to the whole process group, DataLoader workers included, as Slurm
    (or a terminal's Ctrl-C) delivers it: the step finishes, a checkpoint is saved, the exit
    status is 75 (requeue me), 130 after Ctrl-C."""
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
    assert proc.returncode == (130 if sig == signal.SIGINT else 75), err[-3000:]
    assert ("interrupted (Ctrl-C)" if sig == signal.SIGINT else "preempted") in out
    assert "Traceback" not in err, err[-3000:]
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


# ---- W&B on a machine that cannot reach it (this one: no internet) -------------------------

# A key of the right shape: W&B accepts it locally and only the server could refuse it.
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
# The bound on deciding that W&B is unreachable (the default init timeout is 7 s; W&B's
# service start-up comes on top).
DECIDE_WITHIN_S = 10.0


def no_internet_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment with a W&B key, W&B's mode left to the config, W&B's own config and
    cache in the test's directory."""
    env = test_env(
        WANDB_API_KEY=FAKE_WANDB_KEY,
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
    )
    env.pop("WANDB_MODE")
    return env


def waited_s(line: str) -> float:
    import re

    m = re.search(r"within ([0-9.]+) s", line)
    assert m, line
    return float(m.group(1))


@pytest.mark.timeout(300)
def test_auto_mode_without_internet_logs_offline_and_a_requeue_continues_the_run(
    tiny_data: Path, tmp_path: Path
) -> None:
    run, env = tmp_path / "run", no_internet_env(tmp_path)
    wb = ("logging.wandb=true", "logging.wandb_mode=auto", "checkpoint.every=100")
    first = ok(train_cli(tiny_data, run, "train.max_steps=10", "train.stop_at_step=5", *wb,
                         env=env))  # fmt: skip
    (line,) = [ln for ln in first.stdout.splitlines() if "could not reach" in ln]
    assert waited_s(line) < DECIDE_WITHIN_S, line
    command = f"wandb sync {run / 'wandb'}"
    assert line.endswith(f"logging offline instead to {run / 'wandb'}. Upload later: {command}")
    # The run's end repeats the command.
    assert first.stdout.rstrip().endswith(f"Upload it with: {command}"), first.stdout[-500:]
    # Nothing but the offline record: the failed online attempt left no run directory.
    dirs = [p.name for p in (run / "wandb").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(dirs) == 1 and dirs[0].startswith("offline-run-"), dirs

    # The requeued job (same run dir, resume=auto) continues the offline run without waiting.
    second = ok(train_cli(tiny_data, run, "train.max_steps=10", *wb, env=env))
    assert "could not reach" not in second.stdout
    assert "continuing its offline record" in second.stdout
    assert second.stdout.rstrip().endswith(f"Upload it with: {command}")

    files = find_offline_runs(run / "wandb")
    assert len(files) == 2 and all(f.parent.name.startswith("offline-run-") for f in files)
    info = read_run_info(run / "wandb")  # raises if the files name different run ids
    assert [s["resume"] for s in info["segments"]] == [True, True]
    saved = json.loads((run / "checkpoints" / "step_0000010" / "train_state.json").read_text())
    assert info["run_id"] == saved["wandb_run_id"]
    # The metrics read back from the offline files are the run's metrics, every step once.
    history = {int(r["_step"]): r for r in read_history(run / "wandb") if "loss" in r}
    jsonl = losses(run)
    assert sorted(history) == sorted(jsonl) == list(range(1, 11))
    for step, loss in jsonl.items():
        assert history[step]["loss"] == pytest.approx(loss, rel=1e-6)
    # Same config as a plain offline run: the resolved config.
    assert read_wandb_config(run / "wandb")["train"]["max_steps"] == 10

    # The printed command names exactly these files (a dry run needs no network or login).
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", str(run / "wandb")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Would sync 2 run(s)" in proc.stderr + proc.stdout, proc.stderr[-2000:]


@pytest.mark.timeout(300)
def test_online_mode_without_internet_fails_fast_on_every_rank(
    tiny_data: Path, tmp_path: Path
) -> None:
    """2 ranks: rank 0 cannot start W&B, and both stop, the message said once (no rank is left
    waiting in a collective for the other)."""
    run = tmp_path / "run"
    proc = torchrun(
        2,
        ["-m", "pretrain.train", "experiment=debug", f"data.dir={tiny_data}", f"run.dir={run}",
         "strategy=ddp", "logging.wandb=true", "logging.wandb_mode=online", "dist.timeout_s=120"],
        env=no_internet_env(tmp_path),
        timeout=240,
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "error: logging.wandb_mode=online" in ln]
    assert len(errors) == 1, proc.stderr[-3000:]  # said once, though every rank stops
    assert "Nothing was trained" in errors[0] and "logging.wandb_mode=auto" in errors[0]
    assert waited_s(errors[0]) < DECIDE_WITHIN_S
    # A message, not a traceback (torchrun prints its own for the failed workers).
    assert str(REPO / "pretrain") not in proc.stderr, proc.stderr[-3000:]
    assert not (run / "checkpoints").exists()
    assert not [r for r in read_metrics(run) if "loss" in r]


# ---- regularisation: early stopping, L1 -------------------------------------------------------


@pytest.fixture(scope="module")
def overfit_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus a 0.5M-parameter model overfits within ~150 steps: 4 stdlib files, split into
    ~3 train documents (~10k tokens) and a val document."""
    from pretrain.prepare import run_prepare
    from tests.data_fixtures import make_corpus, tiny_config

    root = tmp_path_factory.mktemp("overfit")
    corpus = make_corpus(root / "corpus", n_files=4)
    data = run_prepare(tiny_config(corpus, root / "data", val_fraction=0.4))
    splits = json.loads((data / "manifest.json").read_text())["splits"]
    assert splits["train"]["shards"] and splits["val"]["shards"]
    return data


# debug model widened to 128 (0.48M parameters), no weight decay, a constant 3e-3: on ~10k train
# tokens the training loss falls steadily and the validation loss turns up within ~150 steps.
# 16 data partitions: the ~157 train windows cannot fill the default 1024.
OVERFIT = ("data.partitions=16", "model.n_embd=128", "optim.lr=3e-3", "optim.weight_decay=0", "schedule=constant",
           "schedule.warmup_steps=5", "train.max_steps=1000", "train.eval_every=20",
           "train.eval_batches=4", "logging.every=20", "checkpoint.every=1000",
           "checkpoint.keep_last=1", "train.early_stop_patience=3",
           "train.early_stop_min_delta=0.001")  # fmt: skip


def expected_stop(val: list[tuple[int, float]], patience: int, min_delta: float) -> tuple:
    """(stop step, best step, best loss) recomputed from the logged validation losses."""
    best, best_step, bad = math.inf, 0, 0
    for step, loss in val:
        if loss < best - min_delta:
            best, best_step, bad = loss, step, 0
        else:
            bad += 1
        if bad == patience:
            return step, best_step, best
    raise AssertionError(f"no early stop in {val}")


@pytest.mark.timeout(300)
def test_early_stopping_on_an_overfitting_run(overfit_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = ok(train_cli(overfit_data, run, *OVERFIT))
    rows = read_metrics(run)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    stop, best_step, best = expected_stop(val, patience=3, min_delta=0.001)
    assert stop < 1000 and val[-1][0] == stop == max(train)  # nothing trained after the stop
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("early stop at step")]
    assert line.startswith(f"early stop at step {stop}: the validation loss has not improved")
    assert f"best {best:.4f} at step {best_step}" in line and "step_" in line
    # It stopped because the run overfit: training loss kept falling, validation loss rose.
    assert train[stop] < train[best_step] and val[-1][1] > best

    # `best` next to `latest`, kept although keep_last=1.
    root = run / "checkpoints"
    names = [p.name for p in checkpoint.list_checkpoints(root)]
    assert names == [checkpoint.step_dir_name(best_step), checkpoint.step_dir_name(stop)]
    assert checkpoint.read_pointer(root, "best") == names[0]
    assert checkpoint.read_pointer(root, "latest") == names[1]
    # Every consumer finds it in one place, by any of its names.
    for name in (run / "best", root / "best"):
        assert checkpoint.resolve(name) == root / names[0]
    assert checkpoint.resolve(run / "latest") == checkpoint.resolve(run) == root / names[1]

    # `best` holds the weights that scored the best validation loss: score them again, the way
    # evaluate() does (first eval_batches micro-batches of the val split, in order). Same model
    # and data in fp32, another process (and thread count): the loss is a mean over 1024 tokens
    # of log-softmaxes over 512 logits, so reduction-order noise is within (1024 + 512)·u ≈ 1e-4
    # relative (u = 2^-24). The stop checkpoint scores distinctly worse (the run overfit).
    from pretrain.data.loader import TokenLoader
    from pretrain.sample import load_model

    def val_loss(ckpt: Path) -> float:
        model, _ = load_model(ckpt)
        cfg = checkpoint.read_config(ckpt)
        loader = TokenLoader(
            overfit_data, "val", 64, 4, seed=cfg["data"]["seed"], loop=False, partitions=None
        )
        with torch.no_grad():
            batch_losses = [float(model(x, y)[1]) for x, y in itertools.islice(loader, 4)]
        return sum(batch_losses) / len(batch_losses)

    assert val_loss(run / "best") == pytest.approx(best, rel=1e-4)
    assert val_loss(run / "latest") == pytest.approx(val[-1][1], rel=1e-4)
    assert val[-1][1] - best > 10 * 1e-4 * best  # ten times the tolerance apart

    # Resuming (resume=auto, as a requeued job would) does not train on.
    again = ok(train_cli(overfit_data, run, *OVERFIT))
    assert f"nothing to train: this run stopped early at step {stop}" in again.stdout
    assert read_metrics(run) == rows
    assert [p.name for p in checkpoint.list_checkpoints(root)] == names


@pytest.mark.timeout(200)
def test_large_l1_zeroes_most_matmul_weights_on_the_test_corpus(
    tiny_data: Path, tmp_path: Path
) -> None:
    """optim.l1=2 with the debug schedule (lr up to 1e-3): a shrinkage of up to 2e-3 per step,
    more than an Adam step moves a weight, against weights initialised with std 0.02. Most of
    the weight-decay group ends at exactly zero. Biases, norm gains and position embeddings
    are outside it: shrunk the same way, position embeddings (std 0.02 too) would mostly vanish
    and biases (which start at 0) could never leave zero."""
    from pretrain.optim import param_groups

    run = tmp_path / "run"
    ok(train_cli(tiny_data, run, "train.max_steps=20", "optim.l1=2"))
    cfg = checkpoint.read_config(run)
    torch.manual_seed(cfg["run"]["seed"])  # the engine builds the model from run.seed
    init = GPT(GPTConfig(**cfg["model"]))
    decay_ids = {id(p) for p in param_groups(init, 0.1)[0]["params"]}
    decay = [n for n, p in init.named_parameters() if id(p) in decay_ids]
    rest = [n for n, p in init.named_parameters() if id(p) not in decay_ids]
    final = checkpoint.load_model_weights(run)

    def small(weights: dict[str, torch.Tensor], names: list[str]) -> float:
        """Fraction of the elements of `names` whose magnitude is below 1e-6."""
        assert names
        total = sum(weights[n].numel() for n in names)
        return sum(int((weights[n].abs() < 1e-6).sum()) for n in names) / total

    start = {n: p.detach() for n, p in init.named_parameters()}
    assert small(start, decay) < 1e-3 and small(final, decay) > 0.5
    assert small(final, [n for n in rest if "wpe" in n]) < 0.01
    # Some biases get an exactly zero gradient and keep their 0 (the attention key bias: a
    # shift shared by all keys leaves the softmax unchanged); the others moved off it.
    assert small(final, [n for n in rest if n.endswith(".bias")]) < 0.5
    gains = [n for n in rest if "ln" in n and n.endswith(".weight")]
    assert gains and all(final[n].min() > 0.5 for n in gains)  # norm gains stay near 1


@pytest.mark.timeout(200)
def test_a_run_resumed_past_stop_at_step_trains_nothing(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(train_cli(tiny_data, run, "train.stop_at_step=4", "checkpoint.every=100"))
    out = ok(train_cli(tiny_data, run, "train.stop_at_step=2", "checkpoint.every=100")).stdout
    assert "nothing to train: the run is at step 4, at or past train.stop_at_step=2" in out
    assert max(losses(run)) == 4 and len(losses(run)) == 4  # no step trained, none twice

    # A bad sampling value: one line, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.sample", f"checkpoint={run}", "max_new_tokens=-3"],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "sample: error: max_new_tokens=-3: must be at least 1"
    ], proc.stderr[-2000:]


def _start(data: Path, run: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pretrain.train", "experiment=debug", f"data.dir={data}",
           f"run.dir={run}", "train.max_steps=100000", *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=REPO, env=env or test_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def _wait_for_rows(run: Path, n: int) -> None:
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= n
    ):
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_one_trainer_per_run_dir_and_no_step_logged_twice(tiny_data: Path, tmp_path: Path):
    """A second trainer on a live run's dir is refused naming the holder; once the holder is
    SIGKILLed (past its last checkpoint) the next start takes the dir over and resumes, and the
    steps between that checkpoint and the kill are in metrics.jsonl once."""
    import os

    run = tmp_path / "run"
    first = _start(tiny_data, run, "checkpoint.every=4")
    _wait_for_rows(run, 7)
    second = train_cli(tiny_data, run, "train.max_steps=10")
    assert second.returncode == 1
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"is in use by a live run (pid {first.pid} on" in errors[0]
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    killed_at = max(losses(run))
    assert killed_at >= 7
    out = ok(train_cli(tiny_data, run, f"train.max_steps={killed_at + 2}")).stdout
    assert "resumed from" in out
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, killed_at + 3))  # each once, in order


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:  # the parent pid
            out.append(int(stat.parent.name))
    return out


def _holds_open(pid: int, path: Path) -> bool:
    import os

    fds = Path(f"/proc/{pid}/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())


@pytest.mark.timeout(300)
def test_a_sigkilled_trainers_dataloader_workers_do_not_keep_the_run_dir(
    tiny_data: Path, tmp_path: Path
) -> None:
    """The trainer alone is SIGKILLed; its DataLoader workers, forked with the lock file open,
    live on (stopped here, as if they had not noticed yet): a restart at once takes the run
    dir, since the lock was the trainer's own."""
    import os

    run = tmp_path / "run"
    first = _start(tiny_data, run, "checkpoint.every=2", "data.num_workers=2")
    _wait_for_rows(run, 3)
    workers = _children(first.pid)
    assert len(workers) >= 2 and all(_holds_open(w, run / ".run.lock") for w in workers)
    try:
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)  # its output pipes stay open in the stopped workers
        out = ok(train_cli(tiny_data, run, "train.max_steps=8", "data.num_workers=2")).stdout
        assert "resumed from" in out
    finally:
        for w in workers:
            os.kill(w, signal.SIGKILL)
        first.communicate(timeout=60)


@pytest.mark.timeout(300)
def test_a_run_dir_held_on_another_node_is_refused_and_a_requeued_job_takes_it_over(
    tiny_data: Path, tmp_path: Path
) -> None:
    """The holder runs on "node-a" (its own hostname, in a UTS namespace) as Slurm job 4242.
    Another job here is refused with the holder's host, pid and start time; the same job
    requeued (a higher SLURM_RESTART_COUNT) takes the dir over while the earlier instance's
    lock still stands (it is stopped: a node gone silent), and resumes its checkpoint."""
    import os
    import re
    import shutil

    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--uts", "true"]).returncode != 0:
        pytest.skip("needs unshare --uts (root, or user namespaces) to give a process a host")
    run = tmp_path / "run"
    cmd = (f"hostname node-a && exec {sys.executable} -m pretrain.train experiment=debug "
           f"data.dir={tiny_data} run.dir={run} train.max_steps=100000 checkpoint.every=2")  # fmt: skip
    holder = subprocess.Popen(
        [unshare, "--uts", "sh", "-c", cmd], cwd=REPO, start_new_session=True,
        env=test_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_rows(run, 3)
        other = train_cli(tiny_data, run, "train.max_steps=8",
                          env=test_env(SLURM_JOB_ID="4243"))  # fmt: skip
        assert other.returncode == 1
        (error,) = [ln for ln in other.stderr.splitlines() if ln.startswith("error:")]
        when = r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
        assert re.search(rf"in use by a live run \(pid {holder.pid} on node-a, {when}", error)
        assert "Slurm job 4242 (restart 0)" in error

        os.killpg(holder.pid, signal.SIGSTOP)
        requeued = ok(train_cli(tiny_data, run, "train.max_steps=8",
                                env=test_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")))  # fmt: skip
        assert "taking the run dir over from this Slurm job's earlier instance" in requeued.stdout
        assert "resumed from" in requeued.stdout
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)


@pytest.mark.timeout(200)
def test_ctrl_c_twice_stops_at_once_unsaved(tiny_data: Path, tmp_path: Path) -> None:
    import os

    run = tmp_path / "run"
    # The second Ctrl-C comes in the middle of the save the first one asked for.
    env = test_env(PRETRAIN_FAILPOINT="checkpoint.after_tensors:interrupt")
    proc = _start(tiny_data, run, "checkpoint.every=100000", "data.num_workers=2", env=env)
    _wait_for_rows(run, 3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted twice: stopped at once without saving" in err
    assert "Traceback" not in err, err[-3000:]
    assert checkpoint.find_resume(run / "checkpoints", "auto") is None


def _limit_file_size_tiny() -> None:
    # Smaller than the tokenizer: the first file a new run writes at start-up fails (EFBIG),
    # as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


@pytest.mark.timeout(200)
def test_a_full_disk_at_start_up_says_so_and_leaves_the_run_dir_usable(
    tiny_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = train_cli(tiny_data, run, "train.max_steps=2", preexec_fn=_limit_file_size_tiny)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "the disk is full writing" in errors[0], proc.stderr[-2000:]
    assert not [p for p in run.rglob("*") if p.is_file() and p.name != ".run.lock" and p.stat().st_size == 1024]  # fmt: skip
    # With room again, the same command runs: nothing half-written stands in its way.
    ok(train_cli(tiny_data, run, "train.max_steps=2"))
