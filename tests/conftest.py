"""Shared test fixtures: tier markers by directory, a small prepared dataset, real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Session fixtures shared by every tier: a small prepared dataset (prepared once per session).
from tests.data_fixtures import (  # noqa: F401
    code_data,
    other_tokenizer_data,
    sft_data,
    tiny_corpus,
    tiny_data,
)

REPO = Path(__file__).resolve().parents[1]
TIERS = ("unit", "distributed", "integration", "slurm", "gpu")


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist every worker computes in its own process: split the cores between them
    # rather than letting each take all of them (the in-process tests' results do not depend on
    # the thread count; their tolerances allow any reduction order).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test's tier is the directory it lives in (tests/<tier>/...): one place, no forgotten marks.
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
        if item.get_closest_marker("gpu"):
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs CUDA: no GPU on this machine"))


def test_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: offline W&B, one thread per process, repo importable."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def torchrun(
    nproc: int,
    args: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `args` (a module: ["-m", "pkg.mod", ...] or a script path) under torchrun with
    `nproc` real processes on this host over gloo. Returns the finished process.

    `--standalone`: the rendezvous store binds port 0, so the system picks a free port at the
    moment it is taken (a port found free earlier may be someone else's by then)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        *args,
    ]
    proc = subprocess.run(
        cmd,
        cwd=cwd or REPO,
        env=env or test_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


test_env.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test, when imported
