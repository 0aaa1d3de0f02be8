"""Every strategy behind `strategy=<name>`: same losses, real sharding, portable checkpoints.

Real processes throughout: 2 ranks on CPU over gloo (torchrun) against 1 plain process.

Engine level (tests/distributed/strategy_worker.py): the debug GPT from one seed, each rank fed
its rows of a fixed global batch, 20 steps through `create_engine` + `engine.setup` +
micro_step/optimizer_step, checkpoints through `pretrain.checkpoint`. One torchrun runs all
strategies in sequence, so DeepSpeed and process-group start-up is paid once.

CLI level (`python -m pretrain.train`): the ZeRO -> FSDP fallback with deepspeed made
unimportable, and resuming 2 -> 1 -> 2 ranks across strategies with the data epoch carried on
and nothing read twice.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain import checkpoint
from tests.conftest import REPO, test_env, torchrun

WORKER = str(REPO / "tests" / "distributed" / "strategy_worker.py")
FP32 = ["ddp", "fsdp", "fsdp_grad_op", "hsdp", "zero1", "zero2", "zero3", "zero3_offload"]
ZERO = ["zero1", "zero2", "zero3", "zero3_offload"]
SMOKE = {  # spec -> what it checks; a few steps each, no checkpoint
    "hsdp:strategy.hsdp_replicas=2": "2 replicas of 1 shard: replicated, not sharded",
    "ddp:precision=bf16": "bf16",
    "fsdp:precision=bf16": "bf16",
    "zero3:precision=bf16": "bf16",
    "ddp:precision=fp16": "fp16",
    "fsdp:precision=fp16": "fp16",
    "zero2:precision=fp16": "fp16",
}
STEPS, SAVE_AT = 20, 10


def env(**extra: str) -> dict[str, str]:
    # DeepSpeed's JIT-built comm op is cached where the Makefile caches it.
    ext = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pretrain" / "torch_extensions")
    )
    return test_env(TORCH_EXTENSIONS_DIR=ext, **extra)


def worker(nproc: int, out: Path, *args: str) -> list[dict[str, Any]]:
    """Run the worker (torchrun for nproc >= 1, a plain process for nproc == 0); the records."""
    argv = [WORKER, "--out", str(out), "--dump", *args]
    if nproc:
        torchrun(nproc, argv, env=env(), timeout=400)
    else:
        proc = subprocess.run(
            [sys.executable, *argv], env=env(), capture_output=True, text=True, timeout=200
        )
        assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(str(out) + ".pt", weights_only=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("strategies")


@pytest.fixture(scope="module")
def single(work: Path) -> dict[str, Any]:
    """One process, micro-batch 4 x accumulation 2: the reference (global batch 8)."""
    recs = worker(
        0, work / "single.json", "--strategies", "single", "--micro", "4", "--accum", "2",
        "--steps", str(STEPS), "--save", str(work / "ckpt"), "--save-at", str(SAVE_AT),
    )  # fmt: skip
    return recs[0]


@pytest.fixture(scope="module")
def two(work: Path) -> dict[str, dict[str, Any]]:
    """2 ranks, micro-batch 2 x accumulation 2 (global batch 8): every strategy, then the
    precision and mesh smoke runs. Keyed by spec."""
    smoke = [f"{spec};steps=3;save_at=0" for spec in SMOKE]
    recs = worker(
        2, work / "two.json", "--strategies", ",".join(FP32 + smoke), "--micro", "2",
        "--accum", "2", "--steps", str(STEPS), "--save", str(work / "ckpt"),
        "--save-at", str(SAVE_AT),
    )  # fmt: skip
    return {r["spec"].split(";steps")[0]: r for r in recs}


def ckpt(work: Path, strategy: str) -> Path:
    return work / "ckpt" / strategy / f"step_{SAVE_AT:07d}"


@pytest.fixture(scope="module")
def resumed(work: Path, two: dict, single: dict) -> dict[str, dict[str, Any]]:
    """The step after SAVE_AT, resumed from checkpoints of another strategy / world size:
    zero3@2 -> fsdp@2, ddp@1, single; single@1 -> zero2@2."""
    z3, one = ckpt(work, "zero3"), ckpt(work, "single")
    out: dict[str, dict[str, Any]] = {}
    recs = worker(
        2, work / "res2.json", "--strategies", "fsdp,zero2", "--load", f"{z3},{one}",
        "--micro", "2", "--accum", "2", "--steps", "1",
    )  # fmt: skip
    out["zero3@2->fsdp@2"], out["single@1->zero2@2"] = recs
    recs = worker(
        1, work / "res1.json", "--strategies", "ddp", "--load", str(z3),
        "--micro", "4", "--accum", "2", "--steps", "1",
    )  # fmt: skip
    out["zero3@2->ddp@1"] = recs[0]
    recs = worker(
        0, work / "res0.json", "--strategies", "single", "--load", str(z3),
        "--micro", "2", "--accum", "4", "--steps", "1",
    )  # fmt: skip
    out["zero3@2->single"] = recs[0]
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---- 1. parity ------------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", FP32)
def test_fp32_losses_equal_single_process(strategy: str, two: dict, single: dict) -> None:
    rec = two[strategy]
    assert rec["world_size"] == 2
    assert len(rec["losses"]) == STEPS == len(single["losses"])
    worst = max(rel(a, b) for a, b in zip(rec["losses"], single["losses"]))
    assert worst <= 1e-5, (strategy, rec["losses"], single["losses"])
    # The run trained (the loss moved), so equal losses are not equal constants.
    assert single["losses"][-1] < single["losses"][0] - 0.1
    for a, b in zip(rec["grad_norms"], single["grad_norms"]):
        assert rel(a, b) <= 1e-4, (strategy, rec["grad_norms"], single["grad_norms"])


def test_initial_weights_are_the_single_process_ones(two: dict, single: dict) -> None:
    # Every rank initialised only its own part, and together they are bit for bit what one
    # process draws from run.seed (fp32 masters, bf16 and fp16 runs included).
    for spec, rec in [("single", single), *two.items()]:
        assert rec["init_max_diff"] == 0.0, spec


def test_no_rank_creates_what_it_will_not_keep(two: dict, single: dict) -> None:
    """Parameter storage a rank holds right after the engine created the model: nothing (the
    meta device) where setup gives it storage, ZeRO-3's own partition where DeepSpeed
    partitions modules as they are created; never the whole model on every rank."""
    assert single["created_bytes"] == [0]
    for spec, rec in two.items():
        bytes_per_param = {"fp32": 4, "bf16": 2, "fp16": 2}[rec["precision"]]
        for created in rec["created_bytes"]:
            if rec["engine"].startswith("zero3"):
                # Half of each parameter (ceil: small ones pad by one element).
                assert 0 < created <= 0.55 * bytes_per_param * rec["num_params"], spec
            else:
                assert created == 0, spec


def test_full_weights_load_under_every_strategy(two: dict, single: dict) -> None:
    # Engine.load_model_weights: the same full tensors read back bit for bit, and the model
    # computes with them what one process does (fp32 up to reduction order).
    for spec, rec in two.items():
        assert rec["load_weights_max_diff"] == 0.0, spec
        if rec["precision"] == "fp32":
            assert rel(rec["load_weights_loss"], single["load_weights_loss"]) <= 1e-5, spec


def test_hsdp_all_reduces_across_replicas_on_the_last_micro_batch_only(
    two: dict, single: dict
) -> None:
    for spec in ("hsdp", "hsdp:strategy.hsdp_replicas=2"):
        first, last = two[spec]["all_reduces_per_micro"]  # accumulation of 2 micro-batches
        assert first == 0 and last > 0, (spec, first, last)
    for spec in ("fsdp", "fsdp_grad_op"):  # no replicas: no all-reduce at all
        assert two[spec]["all_reduces_per_micro"] == [0, 0], spec
    # Deferring the replica reduction does not change the step (2 replicas x 1 shard).
    losses = two["hsdp:strategy.hsdp_replicas=2"]["losses"]
    assert max(rel(a, b) for a, b in zip(losses, single["losses"])) <= 1e-5


def test_zero_strategies_ran_deepspeed(two: dict) -> None:
    # No silent fallback here: these ran DeepSpeed ZeRO (the fallback has its own test).
    for s in ZERO:
        assert two[s]["engine"] == s


# ---- 2. sharding ----------------------------------------------------------------------------


def test_sharding_is_real(two: dict) -> None:
    """Bytes held per rank, measured from the live tensors just before an optimizer step."""
    ddp = two["ddp"]["memory"]
    assert ddp[0] == ddp[1]
    for strategy in ("zero3", "zero3_offload", "fsdp", "fsdp_grad_op", "hsdp"):
        for rank, mem in enumerate(two[strategy]["memory"]):
            for kind in ("params", "grads", "optim"):
                ratio = mem[kind] / ddp[rank][kind]
                assert 0.45 <= ratio <= 0.6, (strategy, rank, kind, mem, ddp[rank])
    for strategy in ("zero1", "zero2"):  # optimizer state (and zero2: gradients) sharded only
        for rank, mem in enumerate(two[strategy]["memory"]):
            assert mem["params"] == ddp[rank]["params"]
            assert 0.45 <= mem["optim"] / ddp[rank]["optim"] <= 0.6, (strategy, mem)
            assert mem["master"] < 0.6 * ddp[rank]["params"]
    for rank, mem in enumerate(two["zero2"]["memory"]):
        assert 0.45 <= mem["grads"] / ddp[rank]["grads"] <= 0.6
    for rank, mem in enumerate(two["zero3_offload"]["memory"]):  # its host-side grad copy
        assert 0.45 <= mem["master_grads"] / ddp[rank]["grads"] <= 0.6
    # hsdp's mesh is real: forcing 2 replicas of a 1-rank shard group replicates everything.
    forced = two["hsdp:strategy.hsdp_replicas=2"]["memory"]
    for rank, mem in enumerate(forced):
        for kind in ("params", "grads", "optim"):
            assert mem[kind] == ddp[rank][kind]


# ---- mixed precision --------------------------------------------------------------------------


def test_mixed_precision_every_family(two: dict, single: dict) -> None:
    fp32 = single["losses"][:3]
    for spec, what in SMOKE.items():
        if what not in ("bf16", "fp16"):
            continue
        losses = two[spec]["losses"]
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
        # Close to fp32, but not fp32 computed under another name.
        assert max(rel(a, b) for a, b in zip(losses, fp32)) < 1e-2, (spec, losses, fp32)
        assert max(rel(a, b) for a, b in zip(losses, fp32)) > 1e-7, (spec, losses, fp32)
    # DeepSpeed bf16 keeps bf16 weights (fp32 masters sit in the optimizer): half the bytes.
    z3 = two["zero3:precision=bf16"]
    assert z3["engine"] == "zero3"
    assert z3["memory"][0]["params"] * 2 == two["zero3"]["memory"][0]["params"]
    # Follows the host's answer (both answers are forced in tests/unit/test_engine.py): where
    # DeepSpeed has fp16 here (CPUs with AVX512-FP16/AMX) zero2 ran on DeepSpeed, elsewhere as
    # its FSDP equivalent, with loss scaling either way.
    from deepspeed.accelerator import get_accelerator

    supported = get_accelerator().is_fp16_supported()
    assert two["zero2:precision=fp16"]["engine"] == ("zero2" if supported else "fsdp_grad_op")


# ---- 3./4. portable checkpoints -------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "run", ["zero3@2->fsdp@2", "zero3@2->ddp@1", "zero3@2->single", "single@1->zero2@2"]
)
def test_resume_other_strategy_and_world_size(
    run: str, resumed: dict, two: dict, single: dict
) -> None:
    source = single if run.startswith("single") else two["zero3"]
    rec = resumed[run]
    # The next step after the checkpoint gives the loss the uninterrupted run had there.
    assert rel(rec["losses"][0], source["losses"][SAVE_AT]) <= 1e-5, (rec["losses"], source)
    # Weights and optimizer state (AdamW moments and step) arrive bit for bit.
    saved, loaded = source["saved_state"], rec["loaded_state"]
    assert saved["model"].keys() == loaded["model"].keys()
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    assert saved["optim"]["state"].keys() == loaded["optim"]["state"].keys()
    for fqn, entry in saved["optim"]["state"].items():
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        for key, v in entry.items():
            assert torch.equal(loaded["optim"]["state"][fqn][key], v), (fqn, key)
    assert float(saved["optim"]["state"]["transformer.wte.weight"]["step"]) == SAVE_AT


def test_export_consolidated_weights_from_any_strategy(work: Path, two: dict, single: dict) -> None:
    from safetensors import safe_open

    from pretrain.checkpoint import load_model_weights
    from pretrain.export import export_safetensors, load_safetensors
    from pretrain.model import GPT, GPTConfig

    reference = load_model_weights(ckpt(work, "single"))
    for strategy in ["single", *FP32]:
        path = export_safetensors(ckpt(work, strategy), work / "export" / f"{strategy}.safetensors")
        weights = load_safetensors(path)
        assert weights.keys() == reference.keys()
        for k, v in reference.items():
            # Same training, another strategy: same weights up to fp32 reduction order.
            assert torch.allclose(weights[k], v, rtol=1e-4, atol=2e-5), (strategy, k)
        with safe_open(str(path), "pt") as f:
            cfg = json.loads(f.metadata()["model"])
        GPT(GPTConfig(**cfg)).load_state_dict(weights, strict=True)


def test_deepspeed_zero_to_fp32_equals_our_weights(work: Path, two: dict) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.checkpoint import load_model_weights

    for strategy in ZERO:
        ours = load_model_weights(ckpt(work, strategy))
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt(work, strategy) / "deepspeed"))
        assert theirs.keys() == ours.keys(), strategy
        for k in ours:
            assert torch.equal(theirs[k], ours[k]), (strategy, k)
    # And the script DeepSpeed put in the checkpoint, as a user would run it.
    native = ckpt(work, "zero3") / "deepspeed"
    out = work / "zero_to_fp32"
    proc = subprocess.run(
        [sys.executable, str(native / "zero_to_fp32.py"), str(native), str(out)],
        env=env(), capture_output=True, text=True, timeout=120, cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(out / "pytorch_model.bin", weights_only=True)
    ours = load_model_weights(ckpt(work, "zero3"))
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


# ---- CLI: fallback, and resume 2 -> 1 -> 2 ranks --------------------------------------------


def cli_args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "-m", "pretrain.train", "experiment=debug", f"data.dir={data}", f"run.dir={run}",
        "train.micro_batch=2", "train.global_batch_tokens=256", "checkpoint.every=2",
        "train.eval_batches=1", "dist.timeout_s=120", *extra,
    ]  # fmt: skip


def no_deepspeed(tmp: Path) -> dict[str, str]:
    """An environment in which `import deepspeed` fails (a shim package first on the path)."""
    shim = tmp / "shim" / "deepspeed"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text('raise ImportError("deepspeed is disabled for this test")\n')
    e = env()
    e["PYTHONPATH"] = f"{shim.parent}{os.pathsep}{e['PYTHONPATH']}"
    return e


def windows(loader: Any, batches: int) -> list[bytes]:
    """The first `batches` batches of `loader` as windows (x plus the last target token)."""
    out = []
    for x, y in itertools.islice(loader, batches):
        rows = torch.cat([x, y[:, -1:]], dim=1)  # [B, seq_len + 1]: the window
        out += [r.numpy().tobytes() for r in rows]
    return out


def consumed(data: Path, cfg: dict, ckpt_before: Path | None, ckpt_after: Path) -> list[bytes]:
    """Replay the loader: the windows the run that wrote `ckpt_after` read since
    `ckpt_before` (or from the start), checking the replay ends where the run says it did."""
    from pretrain.data.loader import TokenLoader

    after = json.loads((ckpt_after / "train_state.json").read_text())
    before = json.loads((ckpt_before / "train_state.json").read_text()) if ckpt_before else None
    ws = after["world_size"]
    steps = after["step"] - (before["step"] if before else 0)
    accum = 256 // (2 * 64 * ws)
    out = []
    for r in range(ws):
        loader = TokenLoader(
            data, "train", 64, 2, rank=r, world_size=ws, seed=cfg["data"]["seed"], num_workers=0
        )
        if before:
            loader.load_state_dict(before["loader"])
        out += windows(loader, steps * accum)
        assert loader.state_dict() == after["loader"][r]  # the run read exactly these
    return out


@pytest.mark.timeout(600)
def test_cli_fallback_and_resume_across_world_sizes(tiny_data: Path, tmp_path: Path) -> None:
    # Fallback refused on request: a clear message, nothing trained.
    proc = subprocess.run(
        [sys.executable, *cli_args(tiny_data, tmp_path / "refused", "strategy=zero3",
                                   "strategy.fallback=error", "train.max_steps=2")],
        cwd=REPO, env=no_deepspeed(tmp_path), capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "strategy=zero3 needs DeepSpeed" in proc.stderr, proc.stderr[-3000:]
    assert "strategy.fallback=fsdp" in proc.stderr

    # 2 ranks, zero3 without DeepSpeed: runs as FSDP full shard and says so.
    r1 = tmp_path / "r1"
    p1 = torchrun(2, cli_args(tiny_data, r1, "strategy=zero3", "train.max_steps=4"),
                  env=no_deepspeed(tmp_path), timeout=300)  # fmt: skip
    assert "strategy=zero3: deepspeed failed to import" in p1.stdout, p1.stdout[-3000:]
    assert "running its FSDP equivalent instead (FSDP2 full shard)" in p1.stdout
    assert p1.stdout.count("running its FSDP equivalent") == 1  # rank 0 only
    assert "strategy fsdp x2" in p1.stdout
    assert len((r1 / "metrics.jsonl").read_text().splitlines()) >= 4

    # 2 -> 1: resume r1's step-2 checkpoint in one process (strategy single).
    r2 = tmp_path / "r2"
    c1 = r1 / "checkpoints" / "step_0000002"
    proc = subprocess.run(
        [sys.executable, *cli_args(tiny_data, r2, "strategy=single", "train.max_steps=4",
                                   f"checkpoint.resume={c1}")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy single x1" in proc.stdout and "resumed from" in proc.stdout

    # 1 -> 2: resume r2's step-4 checkpoint on 2 ranks with DeepSpeed ZeRO-2.
    r3 = tmp_path / "r3"
    c2 = r2 / "checkpoints" / "step_0000004"
    p3 = torchrun(2, cli_args(tiny_data, r3, "strategy=zero2", "train.max_steps=6",
                              f"checkpoint.resume={c2}"), env=env(), timeout=300)  # fmt: skip
    assert "strategy zero2 x2" in p3.stdout and "FSDP equivalent" not in p3.stdout
    c3 = r3 / "checkpoints" / "step_0000006"
    assert (c3 / "deepspeed" / "zero_to_fp32.py").is_file()

    # The data: each run carried on the epoch of the one before, reading nothing twice.
    import yaml

    cfg = yaml.safe_load((r1 / "config.yaml").read_text())
    first = consumed(tiny_data, cfg, None, c1)  # 2 ranks, steps 1-2
    second = consumed(tiny_data, cfg, c1, c2)  # 1 rank, steps 3-4
    third = consumed(tiny_data, cfg, c2, c3)  # 2 ranks, steps 5-6
    assert len(first) == len(second) == len(third) == 8  # 256 tokens / 64 per window x 2 steps
    states = [json.loads((c / "train_state.json").read_text()) for c in (c1, c2, c3)]
    assert [s["epoch"] for s in states] == [0, 0, 0]
    from pretrain.data.loader import TokenLoader

    full = TokenLoader(tiny_data, "train", 64, 1, loop=False, seed=cfg["data"]["seed"])
    epoch = Counter(windows(full, full.windows_per_epoch))  # one whole epoch
    assert sum(epoch.values()) == full.windows_per_epoch
    read = Counter(first + second + third)
    over = {w: n for w, n in read.items() if n > epoch[w]}
    assert not over, f"{len(over)} windows read more often than the epoch holds them"


# A background save's files that differ from a synchronous one's by design: DCP's metadata
# names the directory and a save id; train_state.json and config.yaml are the run's.
OWN_FILES = ("dcp/.metadata", "train_state.json", "config.yaml")


@pytest.mark.parametrize("strategy", ["single", *FP32])
def test_background_checkpoint_is_the_synchronous_one(
    strategy: str, work: Path, two: dict, single: dict
) -> None:
    """The same step saved both ways, the background one staged and then written while the
    next steps changed the weights: every file holds the same bytes (DeepSpeed's own files
    too), and the background one is complete and verified."""
    sync = ckpt(work, strategy)
    background = work / "ckpt" / f"{strategy}-async" / sync.name
    assert checkpoint.is_complete(background) and checkpoint.verify(background) is None
    a = json.loads((sync / checkpoint.CHECKSUMS).read_text())["files"]
    b = json.loads((background / checkpoint.CHECKSUMS).read_text())["files"]
    assert a.keys() == b.keys()
    if strategy in ZERO:
        assert any(name.startswith("deepspeed/") for name in a)
    differ = [name for name in a if a[name] != b[name] and name not in OWN_FILES]
    # DeepSpeed's pickles of the live state keep views of its flat buffers (whole storages);
    # the staged copies are tensors of their own: the same values, other bytes.
    for name in [n for n in differ if n.startswith("deepspeed/") and n.endswith(".pt")]:
        assert same_tensors(
            torch.load(sync / name, weights_only=False),
            torch.load(background / name, weights_only=False),
        ), name
        differ.remove(name)
    assert not differ


def same_tensors(a: Any, b: Any) -> bool:
    """Whether two loaded pickles hold equal tensors in the same places."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_tensors(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return True  # not a tensor (DeepSpeed's config objects compare by identity)


@pytest.mark.parametrize("strategy", ["single", *FP32])
def test_plan_counts_the_staging_copy(strategy: str, work: Path, two: dict, single: dict) -> None:
    """`pretrain.plan`'s staging copy of a background save against the bytes the stagers hold
    (measured from their buffers), on the rank that holds the most."""
    from pretrain.model import GPTConfig
    from pretrain.plan.costs import estimate

    rec = single if strategy == "single" else two[strategy]
    cfg = GPTConfig(**checkpoint.read_config(ckpt(work, strategy))["model"])
    world = rec["world_size"]
    plain = estimate(cfg, strategy, world, 2, 64, "fp32", False, device="cpu")
    staged = estimate(cfg, strategy, world, 2, 64, "fp32", False, device="cpu", async_save=True)
    planned = staged.phases["train"].total - plain.phases["train"].total
    measured = max(rec["staged_bytes"])
    assert planned == pytest.approx(measured, rel=0.05), (planned, measured)
