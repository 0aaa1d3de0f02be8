"""The one adapter over DeepSpeed's internals (pretrain/engine/deepspeed_state.py) against the
installed DeepSpeed: every private attribute it reads exists, under every ZeRO stage, and means
what the adapter assumes (each rank's fragment of a parameter is a view of the fp32 master that
the optimizer steps, holding that parameter's values). A DeepSpeed upgrade that changes any of
them fails here, by name.

The stages run in one lone child process (a 1-rank process group, as `python -m pretrain.train`
runs it), one after the other: DeepSpeed keeps process-wide state that an engine in this pytest
process would leave to the next test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ["zero1", "zero2", "zero3", "zero3_offload"]
NO_TRIM = "zero3+strategy.trim_heap_in_backward=false"  # a stage, then its config overrides


def probe(strategy: str, *overrides: str) -> dict[str, Any]:
    """Build a tiny model under `strategy`, take a step, and check the adapter's view of it."""
    import torch
    from hydra import compose, initialize_config_dir

    from pretrain.engine import create_engine
    from pretrain.engine.deepspeed_state import DeepSpeedState
    from pretrain.model import GPT, GPTConfig
    from pretrain.optim import build_optimizer

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                "experiment=debug",
                f"strategy={strategy}",
                "strategy.fallback=error",
                "model.vocab_size=128",
                *overrides,
            ],
        )
    engine = create_engine(cfg)  # type: ignore[arg-type]
    model_cfg = GPTConfig(**cfg.model)
    engine.build(model_cfg, lambda m: build_optimizer(m, cfg.optim, engine.device))
    internals = engine.internals
    assert isinstance(internals, DeepSpeedState)
    internals.check()
    reference = GPT(model_cfg, seed=cfg.run.seed)
    out: dict[str, Any] = {"stage": internals.stage, "params": 0}
    # One process owns everything: every parameter is one fragment, a view of a flat master
    # partition that holds exactly the single-process initial values.
    flats = {id(flat) for _, flat in internals.flat_masters()}
    for name, p in reference.named_parameters():
        frag = internals.fragment(engine.raw_model.get_parameter(name))
        assert frag is not None, name
        assert (frag.start, frag.numel) == (0, p.numel()), (name, frag.start, frag.numel)
        assert id(frag.flat) in flats, name
        assert frag.master.data_ptr() == frag.flat.data_ptr() + 4 * frag.offset, name
        assert torch.equal(frag.master.cpu(), p.detach().reshape(-1)), name
        out["params"] += 1
    # A step moves the masters through the optimizer state the fragments point into.
    x = torch.randint(0, 128, (2, 16))
    import pretrain.engine.zero as zero_engine

    trims: list[int] = []  # heap trims in each backward (the real one runs, and is counted)
    real_trim = zero_engine.release_host_memory
    zero_engine.release_host_memory = lambda: (trims.append(1), real_trim())[1]
    out["trims"] = []

    def micro_step(last: bool) -> None:
        engine.micro_step(x, x, last)
        out["trims"].append(len(trims))
        trims.clear()

    micro_step(False)  # an accumulation of two: the second finds the partition resident
    micro_step(True)
    out["n_layer"] = model_cfg.n_layer
    grads = internals.zero.grad_partitions_flat_buffer if internals.stage == 3 else None
    # In plain host memory (not a GPU's, not pinned) the adapter releases its pages.
    host = grads is not None and grads.device.type == "cpu" and not grads.is_pinned()
    out["host_partition"] = host
    if host:
        # The gradient partition the adapter releases is the one backward writes into ...
        assert bool(grads.ne(0).any())
    engine.optimizer_step(1e-3, 1.0)
    if host:
        # ... and after the step its pages are gone: zeros, but for the two partial edge pages.
        import mmap

        per_page = mmap.PAGESIZE // grads.element_size()
        assert grads.numel() > 8 * per_page
        assert int(grads.ne(0).sum()) <= 2 * per_page
    micro_step(True)  # the next step's first backward fills the released partition again
    zero_engine.release_host_memory = real_trim
    state = engine.state_dict()
    for name, p in reference.named_parameters():
        frag = internals.fragment(engine.raw_model.get_parameter(name))
        assert frag is not None
        for key in ("exp_avg", "exp_avg_sq"):
            moment = engine.optimizer.state[frag.flat][key]
            assert moment.shape == frag.flat.shape, (name, key)
            (shard,) = state["optim"]["state"][name][key].local_shards()
            assert shard.tensor.data_ptr() == moment.data_ptr() + 4 * frag.offset, (name, key)
        (shard,) = state["model"][name].local_shards()
        assert shard.tensor.data_ptr() == frag.master.data_ptr(), name
        assert not torch.equal(frag.master.cpu(), p.detach().reshape(-1)), name  # it moved
    assert internals.loss_scale() is not None
    return out


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pretrain" / "torch_extensions")
    )
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = tmp_path_factory.mktemp("deepspeed") / "probe.json"
    proc = subprocess.run(
        [sys.executable, __file__, ",".join([*STAGES, NO_TRIM]), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STAGES)
def test_adapter_matches_the_installed_deepspeed(strategy: str, probed: dict[str, Any]) -> None:
    result = probed[strategy]
    assert result["stage"] == (3 if strategy.startswith("zero3") else 2)
    assert result["params"] > 10


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STAGES)
def test_zero3_trims_the_heap_in_its_first_backward_only(
    strategy: str, probed: dict[str, Any]
) -> None:
    """A ZeRO-3 gradient partition in host memory, whose pages were released, fills in the next
    backward: the heap's freed blocks go back to the OS as each block's backward begins. The
    next micro-batch's backward finds the partition resident and trims nothing, the first
    backward after the step trims again; stages whose gradients are not released never trim."""
    result = probed[strategy]
    if result["host_partition"]:
        assert result["trims"] == [result["n_layer"], 0, result["n_layer"]]
    else:
        assert result["trims"] == [0, 0, 0]


def test_the_heap_trim_can_be_turned_off(probed: dict[str, Any]) -> None:
    result = probed[NO_TRIM]
    assert result["host_partition"] and result["trims"] == [0, 0, 0]


def test_a_missing_internal_is_named() -> None:
    """What an upgrade that renamed an attribute looks like: one error naming each one."""
    pytest.importorskip("deepspeed")
    from pretrain.engine.deepspeed_state import REQUIRED, DeepSpeedChanged, DeepSpeedState

    engine = SimpleNamespace(**dict.fromkeys(REQUIRED["engine"]))
    zero = SimpleNamespace(**dict.fromkeys(REQUIRED["zero12"]))
    del zero.single_partition_of_fp32_groups
    engine.optimizer = zero
    with pytest.raises(DeepSpeedChanged) as err:
        DeepSpeedState(engine, [SimpleNamespace(_hp_mapping=None)])  # type: ignore[list-item]
    message = str(err.value)
    assert "single_partition_of_fp32_groups" in message
    assert "bit16_groups" not in message  # only what is missing
    assert "deepspeed_state.py" in message


if __name__ == "__main__":
    from pretrain.engine.process_group import reset_accelerate_state

    results = {}
    for name in sys.argv[1].split(","):  # in sequence: DeepSpeed starts once
        results[name] = probe(*name.split("+"))
        reset_accelerate_state()
    Path(sys.argv[2]).write_text(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed leaves threads behind that can stall interpreter exit
