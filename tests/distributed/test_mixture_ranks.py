"""A mixture through the CLI with real processes: optimizer step k sees the same windows at any
world size x workers and micro-batch x accumulation (the losses agree to fp32 rounding), and a
run resumed on another world size continues the same order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.metrics import read_metrics
from tests.conftest import REPO, test_env, torchrun

# fp32 unit roundoff; the step's loss is a mean over 512 tokens, reduced in another order
# (other micro batches, another rank split): within 512·u relative, as test_train explains.
U32 = 2.0**-24


def mix(web: Path, code: Path, w_web: float = 0.7, w_code: float = 0.3) -> str:
    return f"data.mix={{web: {{dir: {web}, weight: {w_web}}}, code: {{dir: {code}, weight: {w_code}}}}}"


def args(web: Path, code: Path, run: Path, *extra: str) -> list[str]:
    return [
        "-m", "pretrain.train", "experiment=debug", mix(web, code), f"run.dir={run}",
        "train.global_batch_tokens=512", "train.max_steps=6", "checkpoint.every=3",
        "train.eval_batches=0", *extra,
    ]  # fmt: skip


def single(web: Path, code: Path, run: Path, *extra: str) -> None:
    proc = subprocess.run(
        [sys.executable, *args(web, code, run, *extra)],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.mark.timeout(600)
def test_same_steps_at_any_world_size_and_an_elastic_resume(
    tiny_data: Path, code_data: Path, tmp_path: Path
) -> None:
    # 1 rank x 2 workers, micro 4 x accumulation 2, against 2 ranks x 2 workers, micro 4 x 1
    # (stopped at step 3, then resumed by 1 rank x 0 workers, micro 8 x 1: elastic): 8
    # windows of 64 tokens per step in every run, the same windows at every step.
    single(tiny_data, code_data, tmp_path / "one", "train.micro_batch=4", "data.num_workers=2")
    wide = tmp_path / "wide"
    torchrun(2, args(tiny_data, code_data, wide, "train.micro_batch=4", "data.num_workers=2",
                     "train.stop_at_step=3"), env=test_env(), timeout=300)  # fmt: skip
    one = losses(tmp_path / "one")
    assert sorted(one) == list(range(1, 7)) and sorted(losses(wide)) == [1, 2, 3]
    single(tiny_data, code_data, wide, "train.micro_batch=8", "data.num_workers=0")
    resumed = losses(wide)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(one[step], rel=512 * U32, abs=0), step
    counts = [
        {k: r[k] for k in ("tokens/web", "tokens/code")}
        for run in (tmp_path / "one", wide)
        for r in read_metrics(run)
        if r.get("step") == 6 and "tokens/web" in r
    ]
    assert counts[0] == counts[1]
    assert counts[0]["tokens/web"] + counts[0]["tokens/code"] == 6 * 8 * 64
    state = json.loads((wide / "checkpoints" / "step_0000006" / "train_state.json").read_text())
    assert [s["name"] for s in state["loader"][0]["sources"]] == ["web", "code"]
