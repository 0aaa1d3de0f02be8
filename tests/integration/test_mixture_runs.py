"""Mixtures through `python -m pretrain.train` and `pretrain.eval`: exact resume, per-source
metrics in metrics.jsonl, W&B and loss.png, a new phase at resume, the refusals (one line each),
per-source evaluation, and a sweep over a mixture weight."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from pretrain import checkpoint
from pretrain.metrics import read_metrics
from pretrain.sweep.study import storage
from tests.conftest import REPO, test_env
from tests.data_fixtures import prepare_code
from tests.wandb_offline import find_offline_runs, read_history

WINDOW = 64  # debug seq_len: tokens per window
STEP = 8  # windows per optimizer step (global_batch_tokens 512)


def mix(**sources: tuple[Path | str, float]) -> str:
    body = ", ".join(f"{n}: {{dir: {d}, weight: {w}}}" for n, (d, w) in sources.items())
    return f"data.mix={{{body}}}"


def train(run: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pretrain.train", "experiment=debug", f"run.dir={run}",
           "train.global_batch_tokens=512", *overrides]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def by_step(run: Path, key: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if key in r}


@pytest.mark.timeout(600)
def test_a_mixture_run_resumes_exactly_and_reports_each_source(
    tiny_data: Path, code_data: Path, tmp_path: Path
) -> None:
    web_code = mix(web=(tiny_data, 0.7), code=(code_data, 0.3))
    common = (web_code, "train.max_steps=8", "train.eval_every=4", "checkpoint.every=100",
              "model.dropout=0.1", "data.num_workers=2")  # fmt: skip
    wandb = ("logging.wandb=true", "logging.wandb_mode=offline", "logging.plot=true")
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(train(straight, *common, *wandb))
    ok(train(split, *common, "train.stop_at_step=4"))
    assert "resumed from" in ok(train(split, *common)).stdout
    a, b = by_step(straight, "loss"), by_step(split, "loss")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:  # bit for bit, per-source counts included
        for key in ("loss", "grad_norm", "tokens/web", "tokens/code", "epoch/code"):
            assert a[step][key] == b[step][key], (step, key)

    # tokens/<name> on every logged step, cumulative, summing to the run's tokens, each source
    # within two windows of its share; epoch/<name> is the source's read fraction.
    for step, row in a.items():
        web, code = row["tokens/web"] / WINDOW, row["tokens/code"] / WINDOW
        assert web + code == step * STEP
        assert abs(web - 0.7 * step * STEP) < 2 and abs(code - 0.3 * step * STEP) < 2
        assert row["epoch/code"] > 0 and 0 < row["epoch/web"] < row["epoch/code"]

    # Validation: every source's own val split, and the overall figure weighted by the mix.
    val = by_step(straight, "val_loss")
    assert sorted(val) == [4, 8]
    for row in val.values():
        assert row["val_loss"] == pytest.approx(
            0.7 * row["val_loss/web"] + 0.3 * row["val_loss/code"], rel=1e-6
        )
        for name in ("web", "code"):
            assert row[f"val_ppl/{name}"] == pytest.approx(math.exp(row[f"val_loss/{name}"]))
    assert val[8]["val_loss/web"] != val[8]["val_loss/code"]

    # The same figures reach W&B's run files; loss.png is drawn.
    history = [r for f in find_offline_runs(straight / "wandb") for r in read_history(f)]
    logged = {int(r["_step"]): r for r in history if "val_loss/code" in r}
    assert logged[8]["val_loss/code"] == pytest.approx(val[8]["val_loss/code"], rel=1e-6)
    assert any("tokens/web" in r for r in history)
    assert (straight / "loss.png").stat().st_size > 0

    # Tools that need the run's data (compress, a tokenizer lookup) find its first source.
    assert checkpoint.data_dir_of(straight) == str(tiny_data)

    # pretrain.eval scores each source of a mixture and their weighted mean.
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.eval", f"checkpoint={straight}", web_code,
         "max_documents=4"],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    per = result["sources"]
    assert sorted(per) == ["code", "web"]
    assert result["loss"] == pytest.approx(0.7 * per["web"]["loss"] + 0.3 * per["code"]["loss"])


@pytest.mark.timeout(400)
def test_resuming_with_another_mix_starts_a_new_phase_where_the_run_was(
    tiny_data: Path, code_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    common = ("train.max_steps=8", "checkpoint.every=100", "train.eval_batches=0")
    ok(train(run, mix(web=(tiny_data, 0.7), code=(code_data, 0.3)), *common,
             "train.stop_at_step=4"))  # fmt: skip
    before = by_step(run, "tokens/web")[4]
    out = ok(train(run, mix(web=(tiny_data, 0.2), code=(code_data, 0.8)), *common)).stdout
    assert "data mixture changed at window 32 of the run: web 0.700 -> 0.200, code 0.300 -> " \
        "0.800" in out, out[-3000:]  # fmt: skip
    rows = by_step(run, "tokens/web")
    # Steps 5-8 read the new shares; the counts go on from where they were.
    web = (rows[8]["tokens/web"] - before["tokens/web"]) / WINDOW
    code = (rows[8]["tokens/code"] - before["tokens/code"]) / WINDOW
    assert web + code == 4 * STEP and abs(web - 0.2 * 4 * STEP) < 2
    state = json.loads((run / "checkpoints" / "step_0000008" / "train_state.json").read_text())
    phases = state["loader"][0]["phases"]
    assert [p["start"] for p in phases] == [0, 32]


@pytest.fixture(scope="module")
def no_val_data(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A source prepared without a val split (with tiny_data's tokenizer)."""
    return prepare_code(tmp_path_factory, tiny_data, "noval_data", val_fraction=0.0)


def refusal(*overrides: str) -> str:
    """The message the training CLI would print for `overrides` (what `train` checks before it
    touches a process group: the config, then the sources), computed in this process."""
    from hydra import compose, initialize_config_dir

    from pretrain.config import ConfigError, validate
    from pretrain.data import DataError
    from pretrain.training.setup import open_data

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=debug", *overrides])
    try:
        validate(cfg)
        open_data(cfg)
    except (ConfigError, DataError) as e:
        return str(e)
    raise AssertionError(f"not refused: {overrides}")


@pytest.mark.timeout(300)
def test_bad_mixtures_are_refused_in_one_line_naming_the_source(
    tiny_data: Path, code_data: Path, other_tokenizer_data: Path, no_val_data: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    in_process = {
        "missing": (mix(web=(tiny_data, 0.5), code=(tmp_path / "nowhere", 0.5)), "data.mix.code.dir="),
        "tokenizers": (mix(web=(tiny_data, 0.5), other=(other_tokenizer_data, 0.5)), "sources 'web' (tokenizer"),
        "weight": (mix(web=(tiny_data, 0.5), code=(code_data, 0)), "data.mix.code.weight=0"),
        "no-val": (mix(web=(tiny_data, 0.5), code=(no_val_data, 0.5)), "data.mix.code ("),
    }  # fmt: skip
    for case, (arg, says) in in_process.items():
        message = refusal(arg, "train.eval_every=1")
        assert says in message and "\n" not in message, (case, message)

    # Through the CLI: one error line, nothing written; a typo inside the dict is refused too.
    typo = mix(web=(tiny_data, 0.5), code=(code_data, 0.5)).replace("weight: 0.5}}", "wieght: 0.5}}")  # fmt: skip
    for case, (arg, says) in {
        "tokenizers": in_process["tokenizers"],
        "typo": (typo, "Did you mean 'data.mix.code.weight'?"),
    }.items():
        run = tmp_path / case
        proc = train(run, arg, "train.max_steps=2", "train.eval_every=1")
        assert proc.returncode != 0, case
        assert "Traceback" not in proc.stderr, (case, proc.stderr[-3000:])
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and says in errors[0], (case, proc.stderr[-2000:])
        assert not (run / "checkpoints").exists(), case


@pytest.mark.timeout(400)
def test_a_sweep_searches_a_mixture_weight(
    tiny_data: Path, code_data: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "-m", "experiment=debug", "hydra/sweeper=optuna",
         f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", "train.max_steps=2",
         "train.eval_every=2", mix(web=(tiny_data, 0.5), code=(code_data, 0.5)),
         "data.mix.code.weight=interval(0.1, 0.5)"],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=sweep.name, storage=storage(str(sweep / "study.journal")))
    weights = [t.params["data.mix.code.weight"] for t in study.trials]
    assert len(weights) == 2 and all(0.1 <= w <= 0.5 for w in weights)
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        # The trial ran with its weight: the run's config, and the windows each source gave.
        run = sweep / str(t.number)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        code = t.params["data.mix.code.weight"]
        assert cfg["data"]["mix"]["code"]["weight"] == code
        last = by_step(run, "tokens/code")[2]
        share = code / (code + 0.5)
        assert abs(last["tokens/code"] - share * last["tokens_seen"]) < 2 * WINDOW
