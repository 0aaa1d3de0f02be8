"""The memory planner's model-state formulas against memory measured under the real strategies.

One torchrun of 2 gloo processes (`plan_worker.py`) wraps a ~3.3M-parameter GPT with every
strategy of `pretrain.engine` (DeepSpeed ZeRO really running: strategy.fallback=error), takes
an optimizer step and measures, per rank, the bytes of the parameter, gradient and optimizer
tensors each strategy keeps. `pretrain.plan.costs` must match the sum within 15% and each
category within 20% (DeepSpeed ZeRO-2 keeps the whole gradient of a parameter that straddles a
partition boundary: +13% on this small model, nothing on a large one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pretrain.model import GPTConfig
from pretrain.plan.costs import buffer_bytes, estimate
from pretrain.plan.sizes import model_sizes
from tests.conftest import REPO, test_env, torchrun
from tests.distributed.plan_worker import CASES, HSDP_REPLICAS, MICRO_BATCH, MODEL, SEQ_LEN

WORLD = 2
MB = 1e6


def expected(case: str) -> dict[str, int]:
    strategy, precision = case.split(":")
    nodes = HSDP_REPLICAS if strategy == "hsdp" else 1
    e = estimate(GPTConfig(**MODEL), strategy, WORLD, MICRO_BATCH, SEQ_LEN, precision, False, nodes)
    return {"params": e.params, "grads": e.grads, "optim": e.optim, "cpu": e.cpu_bytes}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, Any]]:
    out = tmp_path_factory.mktemp("plan") / "memory"
    # DeepSpeed JIT-builds its CPU communication op once; share the cache `make` uses.
    cache = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/pretrain/torch_extensions")
    )
    env = test_env(TORCH_EXTENSIONS_DIR=cache)
    torchrun(
        WORLD, [str(REPO / "tests/distributed/plan_worker.py"), str(out)], env=env, timeout=540
    )
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for rank in range(WORLD):
        for line in Path(f"{out}.rank{rank}").read_text().splitlines():
            rec = json.loads(line)
            results[(rec["case"], rank)] = rec
    # The table that goes into the docs: run with -s to see it.
    print("\nstrategy:precision  rank  measured params/grads/optim MB  estimated  total meas/est")
    for (case, rank), rec in sorted(results.items()):
        m, e = rec["measured"], expected(case)
        mt, et = sum(m[k] for k in ("params", "grads", "optim")), sum(e.values())
        print(
            f"{case:20s} {rank}  {m['params'] / MB:6.2f} {m['grads'] / MB:6.2f} "
            f"{m['optim'] / MB:6.2f}   {e['params'] / MB:6.2f} {e['grads'] / MB:6.2f} "
            f"{e['optim'] / MB:6.2f} cpu {e['cpu'] / MB:6.2f}   {mt / MB:6.2f}/{et / MB:6.2f}"
            f" = {mt / et:.3f}  ({rec['seconds']} s)"
        )
    return results


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rank", range(WORLD))
def test_model_states_match_measured_memory(
    measured: dict[tuple[str, int], dict[str, Any]], case: str, rank: int
) -> None:
    m = measured[(case, rank)]["measured"]
    e = expected(case)
    got = m["params"] + m["grads"] + m["optim"]
    # On this CPU-only run the offloaded part lives in the same memory as the rest.
    want = e["params"] + e["grads"] + e["optim"] + e["cpu"]
    assert got == pytest.approx(want, rel=0.15), f"{case} rank {rank}: measured {m}, estimated {e}"
    if e["cpu"]:
        return  # the offload split (GPU vs CPU) cannot be seen on a CPU-only machine
    for key in ("params", "grads", "optim"):
        assert m[key] == pytest.approx(e[key], rel=0.20), (
            f"{case} rank {rank}: {key} measured {m[key]}, estimated {e[key]}"
        )


@pytest.mark.timeout(600)
def test_ddp_gradient_buckets_are_a_second_copy_of_the_gradients(
    measured: dict[tuple[str, int], dict[str, Any]],
) -> None:
    # The planner counts DDP's reducer buckets as one more fp32 copy of every gradient
    # (gradient_as_bucket_view=False, torch's and Accelerate's default).
    sizes = model_sizes(GPTConfig(**MODEL))
    want = buffer_bytes("ddp", sizes, WORLD, "fp32")
    for rank in range(WORLD):
        got = measured[("ddp:bf16", rank)]["measured"]["ddp_buckets"]
        assert got == pytest.approx(want, rel=0.05)
