"""optim=muon under every strategy: the single-process losses at 2 ranks, and checkpoints whose
momentum moves between strategies and world sizes.

Real processes: the strategy worker (tests/distributed/strategy_worker.py) trains the debug GPT
on a fixed global-batch stream with `optim=muon`, in one plain process (single) and at 2 ranks
over gloo (ddp, fsdp, zero1, zero2, zero3, zero3_offload in one torchrun), saving a checkpoint
at SAVE_AT.
Under FSDP each rank holds rows of each matrix, under ZeRO fragments of DeepSpeed's flat
partitions: Newton-Schulz still sees whole matrices (pretrain/optim/muon.py), so the losses are
single's. Then the step after SAVE_AT is taken again from checkpoints of another strategy and
world size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from pretrain import checkpoint
from pretrain.training.start import check_same_optimizer
from tests.conftest import REPO, test_env, torchrun

WORKER = str(REPO / "tests" / "distributed" / "strategy_worker.py")
STEPS, SAVE_AT = 12, 6
TWO_RANKS = ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload"]
# A few steps in 16-bit, no checkpoint: fp16's loss scalers (GradScaler, ShardedGradScaler), bf16.
SMOKE = ["ddp:precision=fp16", "fsdp:precision=fp16", "zero3:precision=bf16"]


def run_worker(nproc: int, out: Path, *args: str, optim: str = "muon") -> list[Any]:
    ext = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pretrain" / "torch_extensions")
    )
    env = test_env(TORCH_EXTENSIONS_DIR=ext)
    argv = [WORKER, "--out", str(out), "--dump", *args, "--max-steps", str(STEPS),
            "--set", f"optim={optim}"]  # fmt: skip
    if nproc:
        torchrun(nproc, argv, env=env, timeout=400)
    else:
        proc = subprocess.run(
            [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=200
        )
        assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(str(out) + ".pt", weights_only=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("muon")


def ckpt(work: Path, strategy: str) -> Path:
    return work / "ckpt" / strategy / f"step_{SAVE_AT:07d}"


@pytest.fixture(scope="module")
def runs(work: Path) -> dict[str, dict[str, Any]]:
    """spec -> record. Global batch 8 everywhere: one process micro 4 x accum 2; 2 ranks
    micro 2 x accum 2."""
    save = ("--save", str(work / "ckpt"), "--save-at", str(SAVE_AT), "--steps", str(STEPS))
    one = ("--micro", "4", "--accum", "2")
    (single,) = run_worker(0, work / "single.json", "--strategies", "single", *one, *save)
    (adamw,) = run_worker(
        0, work / "adamw.json", "--strategies", "single", *one, "--steps", str(STEPS),
        "--save", str(work / "adamw"), "--save-at", str(SAVE_AT), optim="adamw",
    )  # fmt: skip
    smoke = [f"{spec};steps=4;save_at=0" for spec in SMOKE]
    two = run_worker(
        2, work / "two.json", "--strategies", ",".join(TWO_RANKS + smoke), "--micro", "2",
        "--accum", "2", *save,
    )  # fmt: skip
    return {
        "single": single,
        "single:adamw": adamw,
        **{r["spec"].split(";steps")[0]: r for r in two},
    }


@pytest.fixture(scope="module")
def resumed(work: Path, runs: dict) -> dict[str, dict[str, Any]]:
    """The step after SAVE_AT from another strategy's checkpoint: zero3@2 -> fsdp@2,
    single@1 -> zero2@2, fsdp@2 -> zero3@2, zero2@2 -> single."""
    loads = [ckpt(work, s) for s in ("zero3", "single", "fsdp")]
    recs = run_worker(
        2, work / "res2.json", "--strategies", "fsdp,zero2,zero3",
        "--load", ",".join(map(str, loads)), "--micro", "2", "--accum", "2", "--steps", "1",
    )  # fmt: skip
    out = dict(zip(["zero3@2->fsdp@2", "single@1->zero2@2", "fsdp@2->zero3@2"], recs))
    (out["zero2@2->single"],) = run_worker(
        0, work / "res1.json", "--strategies", "single", "--load", str(ckpt(work, "zero2")),
        "--micro", "4", "--accum", "2", "--steps", "1",
    )  # fmt: skip
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", TWO_RANKS)
def test_losses_equal_single_process(strategy: str, runs: dict) -> None:
    rec, single = runs[strategy], runs["single"]
    assert rec["world_size"] == 2 and rec["engine"] == strategy
    assert len(rec["losses"]) == STEPS == len(single["losses"])
    worst = max(rel(a, b) for a, b in zip(rec["losses"], single["losses"]))
    assert worst <= 1e-5, (strategy, rec["losses"], single["losses"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("spec", SMOKE)
def test_16_bit_steps(spec: str, runs: dict) -> None:
    """bf16, and fp16 with loss scaling (an overflowing step is skipped whole, Muon's half
    too): the losses are finite and those of fp32 within 16-bit noise."""
    rec, single = runs[spec], runs["single"]
    assert rec["engine"] == spec.split(":")[0] and len(rec["losses"]) == 4
    for a, b in zip(rec["losses"], single["losses"]):
        assert abs(a - b) / b <= 1e-2, (spec, rec["losses"], single["losses"][:4])


@pytest.mark.timeout(600)
def test_muon_trained_and_is_not_adamw(runs: dict) -> None:
    single, adamw = runs["single"], runs["single:adamw"]
    assert single["losses"][-1] < single["losses"][0] - 0.05
    assert max(rel(a, b) for a, b in zip(single["losses"][1:], adamw["losses"][1:])) > 1e-3
    # The portable state of a Muon matrix is its momentum, of everything else AdamW's moments.
    state = single["saved_state"]["optim"]["state"]
    assert set(state["transformer.h.0.attn.c_attn.weight"]) == {"step", "momentum_buffer"}
    assert set(state["transformer.wte.weight"]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", TWO_RANKS)
def test_saved_momentum_is_single_process_momentum(strategy: str, runs: dict) -> None:
    """The checkpoint holds every rank's pieces of each momentum buffer at its place in the full
    matrix (fp32; reduction-order noise only: the tolerance of tests/distributed/test_l1.py)."""
    ref = runs["single"]["saved_state"]["optim"]["state"]
    got = runs[strategy]["saved_state"]["optim"]["state"]
    assert got.keys() == ref.keys()
    for name, entry in ref.items():
        assert got[name].keys() == entry.keys(), name
        for key, value in entry.items():
            torch.testing.assert_close(got[name][key], value, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "move", ["zero3@2->fsdp@2", "single@1->zero2@2", "fsdp@2->zero3@2", "zero2@2->single"]
)
def test_resume_across_strategies_and_world_sizes(move: str, resumed: dict, runs: dict) -> None:
    """The loaded state is the saved one bit for bit (weights, Muon momentum, Adam moments),
    and the next step's loss is the uninterrupted run's."""
    source = move.split("@")[0]
    saved = runs[source]["saved_state"]
    rec = resumed[move]
    loaded = rec["loaded_state"]
    for name, value in saved["model"].items():
        assert torch.equal(loaded["model"][name], value), (move, name)
    for name, entry in saved["optim"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(loaded["optim"]["state"][name][key], value), (move, name, key)
    assert rel(rec["losses"][0], runs[source]["losses"][SAVE_AT]) <= 1e-5, move


@pytest.mark.timeout(600)
def test_resuming_with_the_other_optimizer_is_refused(work: Path, runs: dict) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        muon = compose(config_name="config", overrides=["optim=muon"])
        adamw = compose(config_name="config", overrides=["optim=adamw"])
    muon_ckpt, adamw_ckpt = ckpt(work, "zero2"), work / "adamw" / "single" / f"step_{SAVE_AT:07d}"
    check_same_optimizer(muon, muon_ckpt)  # type: ignore[arg-type]
    check_same_optimizer(adamw, adamw_ckpt)  # type: ignore[arg-type]
    for cfg, path, saved in ((muon, adamw_ckpt, "adamw"), (adamw, muon_ckpt, "muon")):
        with pytest.raises(checkpoint.CheckpointError) as e:
            check_same_optimizer(cfg, path)  # type: ignore[arg-type]
        assert f"written with optim={saved}" in str(e.value)
        assert f"resume with optim={saved}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.timeout(600)
def test_keep_sparsity_and_a_switch_of_optimizer_are_refused(
    tiny_data: Path, tmp_path: Path
) -> None:
    """Muon's update is dense: it would move the masked weights, and a resume or export would
    lose the zeros. A pruned source with train.keep_sparsity (the default) is refused in one
    line; with train.keep_sparsity=false it trains, and resuming that run with AdamW (the
    default optimizer) is refused through the CLI."""
    from pretrain import pruning
    from pretrain.compressed import write_compressed
    from pretrain.model import GPT, GPTConfig
    from tests.distributed.test_init_from import cli, single

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64))
    info = {"prune": pruning.prune_unstructured(model, 0.5), "source": {}, "data": str(tiny_data)}
    source = write_compressed(tmp_path / "u50", model, info, [tiny_data / "tokenizer.model"])
    args = ("optim=muon", f"train.init_from={source}", "train.max_steps=2")
    proc = single(cli(tiny_data, tmp_path / "kept", *args), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.keep_sparsity" in last and "optim=adamw" in last, proc.stderr[-2000:]
    single(cli(tiny_data, tmp_path / "dense", *args, "train.keep_sparsity=false"))
    # That run's checkpoint holds Muon's state: resuming it with AdamW is refused, in one line.
    proc = single(cli(tiny_data, tmp_path / "dense", "train.max_steps=3"), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "written with optim=muon" in last and "resume with optim=muon" in last, last


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_plan_counts_the_state_each_rank_holds(strategy: str, runs: dict) -> None:
    """`pretrain.plan`'s optimizer state for optim=muon (one momentum for the Muon matrices,
    Adam's two moments for the rest, plus ZeRO's fp32 master) against the bytes each rank
    held, measured from the live tensors just before a step (Engine.memory_breakdown)."""
    from pretrain.model import GPTConfig
    from pretrain.plan.costs import model_states
    from pretrain.plan.sizes import model_sizes

    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64)
    plan = model_states(strategy, model_sizes(cfg), 2, "fp32", optimizer="muon").optim
    for rank in runs[strategy]["memory"]:
        held = rank["optim"] + rank["master"]
        assert abs(held - plan) <= 0.01 * plan, (strategy, rank, plan)
