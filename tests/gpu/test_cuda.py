"""CUDA checks: run wherever a GPU is visible (skipped, with the reason, elsewhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.metrics import read_metrics
from pretrain.model import GPT, GPTConfig
from tests.conftest import REPO, test_env

pytestmark = pytest.mark.gpu


@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_train_on_gpu(tiny_data: Path, tmp_path: Path, precision: str) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "experiment=debug", f"data.dir={tiny_data}",
         f"run.dir={run}", "train.device=cuda", f"precision={precision}", "train.max_steps=30"],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on cuda" in proc.stdout
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["mem_gb"] > 0


@torch.no_grad()
def test_cached_generation_matches_uncached_on_gpu() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64))
    model = model.cuda().eval()
    idx = torch.randint(0, 256, (2, 5), device="cuda")
    a = model.generate(idx, 20, temperature=0.0, use_cache=True)
    b = model.generate(idx, 20, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)
