"""The engine layer in one process: DeepSpeed config generation, the FSDP fallback decision,
HSDP mesh shapes, memory accounting, and the single-process engine's accumulation and
portable state. (Multi-process behaviour lives in tests/distributed/test_strategies.py.)"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir

from pretrain.config import ConfigError
from pretrain.engine import StrategyUnavailable, create_engine
from pretrain.engine.fsdp import FSDPEngine, blocks_of, hsdp_shape
from pretrain.engine.hostmem import release_pages
from pretrain.engine.measure import storage_bytes
from pretrain.engine.process_group import reset_accelerate_state
from pretrain.engine.zero import check_geometry, deepspeed_config, merge
from pretrain.model import GPT, GPTConfig
from pretrain.optim import build_optimizer, lr_at

REPO = Path(__file__).resolve().parents[2]


def make_cfg(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(
            config_name="config",
            overrides=["experiment=debug", "model.vocab_size=128", *overrides],
        )


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Any:
    yield
    reset_accelerate_state()


GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def lone_process(monkeypatch: pytest.MonkeyPatch) -> Any:
    """This process as a lone `python -m pretrain.train`: no launcher variables (whatever an
    engine sets is undone afterwards), and no process group left behind."""
    for key in GROUP_ENV:
        # setenv first, so that monkeypatch remembers the key and removes what an engine sets.
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- DeepSpeed config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)]
)
def test_deepspeed_config_from_hydra(name: str, stage: int) -> None:
    cfg = make_cfg(f"strategy={name}", "train.micro_batch=3", "strategy.reduce_bucket_size=1000")
    ds = deepspeed_config(cfg, world_size=2, accum=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1000
    assert ("offload_optimizer" in zero) == ("offload_param" in zero) == (name == "zero3_offload")
    if name == "zero3_offload":
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    if stage == 3:
        assert zero["stage3_param_persistence_threshold"] == 0
        assert zero["stage3_prefetch_bucket_size"] == 1000
        # Gathered parameters are released after their module (not kept for up to 1e9).
        assert zero["stage3_max_reuse_distance"] == 1000
        assert zero["stage3_max_live_parameters"] == 2000
    assert "optimizer" not in ds  # our torch AdamW: no fused-Adam build
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}


def test_deepspeed_buckets_are_sized_to_the_model() -> None:
    # strategy.reduce_bucket_size=0 (the default): n_embd^2 elements, at least 2^20.
    for width, want in ((64, 2**20), (1024, 2**20), (4096, 4096**2)):
        cfg = make_cfg("strategy=zero3", f"model.n_embd={width}", "model.n_head=4")
        zero = deepspeed_config(cfg, 2, 1)["zero_optimization"]
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == want
        assert zero["stage3_prefetch_bucket_size"] == want


def test_deepspeed_config_precision() -> None:
    ds = deepspeed_config(make_cfg("strategy=zero2", "precision=bf16"), 1, 1)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    ds = deepspeed_config(make_cfg("strategy=zero2", "precision=fp16"), 1, 1)
    fp16 = ds["fp16"]
    assert fp16["enabled"] and not ds["bf16"]["enabled"]
    assert fp16["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert fp16["initial_scale_power"] == 16


def test_user_json_is_merged_on_top(tmp_path: Path) -> None:
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "gradient_clipping": 0.5,
                "zero_optimization": {"reduce_bucket_size": 1234, "overlap_comm": "auto"},
                "activation_checkpointing": {"partition_activations": True},
            }
        )
    )
    ds = deepspeed_config(make_cfg("strategy=zero3", f"strategy.deepspeed_config={user}"), 2, 1)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1234
    assert ds["zero_optimization"]["stage"] == 3  # untouched keys stay
    assert ds["zero_optimization"]["overlap_comm"] is False  # "auto" keeps the generated value
    assert ds["activation_checkpointing"] == {"partition_activations": True}


def test_user_json_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        deepspeed_config(
            make_cfg("strategy=zero2", f"strategy.deepspeed_config={tmp_path}/x"), 1, 1
        )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        deepspeed_config(make_cfg("strategy=zero2", f"strategy.deepspeed_config={bad}"), 1, 1)
    opt = tmp_path / "opt.json"
    opt.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="optim"):
        deepspeed_config(make_cfg("strategy=zero2", f"strategy.deepspeed_config={opt}"), 1, 1)


def test_batch_geometry_belongs_to_the_loop() -> None:
    cfg = make_cfg("strategy=zero2", "train.micro_batch=2")
    ds = deepspeed_config(cfg, 2, 2)
    check_geometry(ds, cfg, 2, 2)  # consistent: fine
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        check_geometry(merge(ds, {"train_micro_batch_size_per_gpu": 8}), cfg, 2, 2)


# ---- fallback decision ------------------------------------------------------------------------


def test_unknown_strategy_and_fallback_value() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        create_engine(make_cfg("strategy.name=zero4"))
    with pytest.raises(ValueError, match="strategy.fallback"):
        create_engine(make_cfg("strategy=zero3", "strategy.fallback=maybe"))


def test_fallback_error_refuses_without_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` -> ImportError
    with pytest.raises(StrategyUnavailable, match="strategy=zero3 needs DeepSpeed") as err:
        create_engine(make_cfg("strategy=zero3", "strategy.fallback=error"))
    assert "strategy.fallback=fsdp" in str(err.value)


@pytest.mark.parametrize(
    "name,mode,reshard,offload",
    [
        ("zero1", "fsdp_grad_op", False, False),
        ("zero2", "fsdp_grad_op", False, False),
        ("zero3", "fsdp", True, False),
        ("zero3_offload", "fsdp_offload", True, True),
    ],
)
def test_fallback_picks_the_fsdp_equivalent(
    name: str,
    mode: str,
    reshard: bool,
    offload: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    lone_process: Any,
) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    cfg = make_cfg(f"strategy={name}")
    engine = create_engine(cfg)
    assert isinstance(engine, FSDPEngine)
    assert engine.name == mode
    assert (engine.reshard_after_forward, engine.offload) == (reshard, offload)
    out = capsys.readouterr().out
    assert f"strategy={name}: deepspeed failed to import" in out
    assert "running its FSDP equivalent instead" in out
    assert out.count("FSDP equivalent") == 1
    # It trains, in a lone process (a process group of one), with sharded (DTensor) weights.
    device = engine.device
    engine.build(GPTConfig(**cfg.model), lambda m: build_optimizer(m, cfg.optim, device))
    assert type(next(engine.model.parameters())).__name__ == "DTensor"
    assert train_step(engine, cfg, 0) == pytest.approx(reference_losses()[0], rel=1e-5)


def test_lone_process_group_env(lone_process: Any) -> None:
    from pretrain.engine.process_group import lone_process_group_env

    lone_process_group_env()
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    assert int(os.environ["MASTER_PORT"]) > 0
    os.environ["RANK"] = "7"  # a launcher's variables are never overwritten
    lone_process_group_env()
    assert os.environ["RANK"] == "7"


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("bf16", [True, False])
def test_deepspeed_precision_support_decides_the_fallback(
    fp16: bool, bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether DeepSpeed supports fp16/bf16 is a fact of the host (on CPU: whether oneDNN has
    fp16 kernels for this ISA), so both answers are forced here: a precision DeepSpeed lacks
    is a reason to fall back, naming it; a supported one is none."""
    import deepspeed.accelerator

    from pretrain.engine.zero import unavailable_reason

    real = deepspeed.accelerator.get_accelerator()

    class Forced:
        def is_fp16_supported(self) -> bool:
            return fp16

        def is_bf16_supported(self) -> bool:
            return bf16

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Forced())
    assert unavailable_reason(make_cfg("strategy=zero2"), "cpu") is None  # fp32 always runs
    for dtype, supported in (("fp16", fp16), ("bf16", bf16)):
        reason = unavailable_reason(make_cfg("strategy=zero2", f"precision={dtype}"), "cpu")
        if supported:
            assert reason is None, reason
        else:
            assert reason is not None and f"does not support {dtype}" in reason


# ---- mesh, blocks, accounting -----------------------------------------------------------------


def test_hsdp_shape() -> None:
    assert hsdp_shape(world_size=8, replicas=0, local_world_size=4) == (2, 4)  # node = shard group
    assert hsdp_shape(world_size=2, replicas=0, local_world_size=2) == (1, 2)  # one host
    assert hsdp_shape(world_size=2, replicas=2, local_world_size=2) == (2, 1)  # forced split
    with pytest.raises(ValueError, match="does not divide"):
        hsdp_shape(world_size=4, replicas=3, local_world_size=4)


def test_blocks_of_gpt() -> None:
    model = GPT(GPTConfig(**make_cfg().model))
    assert blocks_of(model) == list(model.transformer.h)
    assert len(blocks_of(model)) == model.cfg.n_layer


def test_storage_bytes_counts_each_storage_once() -> None:
    flat = torch.zeros(100)
    views = [flat[:50], flat[50:]]
    assert storage_bytes(views) == 400
    assert storage_bytes([flat, *views, None]) == 400
    model = GPT(GPTConfig(**make_cfg().model))  # tied embedding: one storage
    assert storage_bytes(model.state_dict().values()) == 4 * model.num_params()


def _rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux only")
def test_release_pages_gives_whole_pages_back_and_keeps_the_edges() -> None:
    import mmap

    page = mmap.PAGESIZE // 4  # float32 elements per page
    whole = torch.ones(64 * 2**20 // 4 + 2 * page)  # 64 MiB and more, every page written
    inner = whole[page // 2 : -page // 2]  # starts and ends inside a page
    before = _rss()
    released = release_pages(inner)
    after = _rss()
    assert released >= 64 * 2**20 and released % mmap.PAGESIZE == 0
    assert before - after >= 0.9 * released / 1024  # kB: the pages really left
    # What was released reads as zeros; the partial pages at both edges keep their values.
    assert int(inner.ne(0).sum()) <= 2 * page
    assert inner[0].item() == 1.0 and inner[-1].item() == 1.0
    assert whole[: page // 2].eq(1).all() and whole[-page // 2 :].eq(1).all()
    inner.fill_(3.0)  # and the memory is usable again, at the same address
    assert inner.eq(3).all()
    assert release_pages(torch.ones(1000, device="meta")) == 0
    assert release_pages(torch.ones(100)) == 0  # no whole page
    # Never memory outside the tensor's elements: a strided or expanded view is refused.
    every_other = torch.ones(64 * page)
    assert release_pages(every_other[::2]) == 0 and every_other.eq(1).all()
    assert release_pages(torch.ones(1).expand(64 * page)) == 0


# A fresh process that sets the threshold (`direct KIB`: set_mmap_threshold; `build KIB`: the
# training loop's Engine.build with train.host_mmap_threshold_kib=KIB; `trim 0`: neither, but
# release_host_memory after the frees, as ZeRO-3's backward calls it), then frees an 8 MiB
# block, so that glibc's own threshold would now be 8 MiB, and builds, writes and frees 128 MiB
# of 512 KiB tensors, a 1 MiB one allocated last so that the heap cannot shrink from its top:
# the pattern of a training step. Prints the RSS growth in MiB after the frees, and whether
# set_mmap_threshold took (direct only).
FREED_BLOCKS = """
import os, sys, torch
from pretrain.engine.hostmem import release_host_memory, set_mmap_threshold
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
how, kib = sys.argv[1], int(sys.argv[2])
took = None
if how == "direct":
    took = set_mmap_threshold(kib)
elif how == "build":
    from tests.unit.test_engine import single_engine
    single_engine(1, f"train.host_mmap_threshold_kib={kib}")
big = torch.ones(2**21); del big
before = rss()
blocks = [torch.ones(2**17) for _ in range(256)]
pin = torch.ones(2**18)
del blocks
if how == "trim":
    release_host_memory()
print(rss() - before, took)
"""


def freed_blocks(how: str, kib: int, **env: str) -> tuple[float, bool]:
    import subprocess

    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", FREED_BLOCKS, how, str(kib)], env={**environ, **env},
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout.split()  # fmt: skip
    return float(out[-2]), out[-1] == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_mmap_threshold_gives_freed_tensors_back() -> None:
    grown, took = freed_blocks("direct", 64)
    assert took and grown < 16, grown  # the 128 MiB went back to the OS as it was freed
    # Off, and the user's own MALLOC_MMAP_THRESHOLD_ wins: the setting is not applied.
    assert freed_blocks("direct", 0)[1] is False
    assert freed_blocks("direct", 64, MALLOC_MMAP_THRESHOLD_="131072")[1] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_build_applies_the_mmap_threshold() -> None:
    grown, _ = freed_blocks("build", 64)
    assert grown < 16, grown


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_release_host_memory_gives_the_heaps_freed_blocks_back() -> None:
    grown, _ = freed_blocks("trim", 0)  # glibc's own threshold: the blocks are in the heap
    assert grown < 16, grown


@pytest.mark.parametrize("kib, match", [(-1, "must be 0"), (65536, "at most that")])
def test_mmap_threshold_out_of_range_is_refused(kib: int, match: str) -> None:
    from pretrain.config import validate

    with pytest.raises(ConfigError, match=f"train.host_mmap_threshold_kib={kib}.*{match}"):
        validate(make_cfg(f"train.host_mmap_threshold_kib={kib}"))


# ---- partitions as checkpoint boxes ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (5, 7), (3, 4, 5), (1, 6), (6, 1)])
def test_flat_ranges_are_cut_into_contiguous_boxes(shape: tuple[int, ...]) -> None:
    from pretrain.engine.fragments import flat_boxes

    n = math.prod(shape)
    index = torch.arange(n).view(shape)
    for start in range(n):
        for end in range(start + 1, n + 1):
            boxes = flat_boxes(shape, start, end)
            assert len(boxes) <= 2 * len(shape) - 1
            covered = []
            for offsets, sizes, first in boxes:
                box = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                flat = box.reshape(-1)
                # Each box is one contiguous run of the flat range, starting at `first`.
                assert flat.tolist() == list(range(first, first + flat.numel()))
                covered += flat.tolist()
            assert covered == list(range(start, end)), (shape, start, end, boxes)
    assert flat_boxes(shape, 3, 3) == []


# ---- the single-process engine ----------------------------------------------------------------


def data(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 128, (rows, 33), generator=g)
    return seq[:, :-1], seq[:, 1:]


def single_engine(accum: int, *overrides: str) -> Any:
    cfg = make_cfg("strategy=single", *overrides)
    engine = create_engine(cfg, accum=accum)
    device = engine.device
    engine.build(GPTConfig(**cfg.model), lambda m: build_optimizer(m, cfg.optim, device))
    return engine, cfg


def train_step(engine: Any, cfg: Any, step: int, rows: int = 8) -> float:
    return train_step_norm(engine, cfg, step, rows)[0]


def train_step_norm(engine: Any, cfg: Any, step: int, rows: int = 8) -> tuple[float, float]:
    """One optimizer step on the global batch of `step`, split into engine.accum micro-batches;
    (mean loss, gradient norm before clipping)."""
    x, y = data(rows, seed=step)
    per = rows // engine.accum
    loss = 0.0
    for m in range(engine.accum):
        sl = slice(m * per, (m + 1) * per)
        loss += float(engine.micro_step(x[sl], y[sl], m == engine.accum - 1)) / engine.accum
    lr = lr_at(step, 20, cfg.optim.lr, cfg.schedule)
    norm = engine.optimizer_step(lr, cfg.optim.grad_clip)
    return loss, float(norm)


_REFERENCE: list[float] = []


def reference_losses() -> list[float]:
    """Three steps of strategy=single on the unit-test batches (computed once)."""
    if not _REFERENCE:
        engine, cfg = single_engine(1)
        _REFERENCE.extend(train_step(engine, cfg, s) for s in range(3))
        reset_accelerate_state()
    return _REFERENCE


def test_gradient_accumulation_equals_the_full_batch() -> None:
    full, cfg = single_engine(1)
    runs_full = [train_step_norm(full, cfg, s) for s in range(3)]
    w_full = {k: v.clone() for k, v in full.raw_model.state_dict().items()}
    reset_accelerate_state()
    acc, cfg = single_engine(4)
    runs_acc = [train_step_norm(acc, cfg, s) for s in range(3)]
    # The gradient is the full batch's (the 1/accum scaling), not accum times it.
    flat = [v for run in runs_acc for v in run]
    assert flat == pytest.approx([v for run in runs_full for v in run], rel=1e-5)
    for k, v in acc.raw_model.state_dict().items():
        assert torch.allclose(v, w_full[k], atol=1e-6), k


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_portable_state_round_trip(precision: str, tmp_path: Path) -> None:
    a, cfg = single_engine(1, f"precision={precision}")
    for s in range(2):
        train_step(a, cfg, s)
    state = a.state_dict()
    assert set(state["optim"]["state"]["transformer.wte.weight"]) == {
        "step",
        "exp_avg",
        "exp_avg_sq",
    }
    assert ("scaler" in state) == (precision == "fp16")
    if precision == "fp16":
        assert set(state["scaler"]) == {"scale", "growth_tracker"}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    expected = train_step(a, cfg, 2)

    reset_accelerate_state()
    b, cfg = single_engine(1, f"precision={precision}")
    template = b.state_dict()  # a fresh engine's structure, filled in place
    dcp.load(template, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    b.load_state_dict(template)
    assert train_step(b, cfg, 2) == pytest.approx(expected, rel=1e-6)


def test_memory_breakdown_of_the_replicated_model() -> None:
    engine, cfg = single_engine(1)
    x, y = data(4)
    engine.micro_step(x, y, True)
    mem = engine.memory_breakdown()
    n = engine.raw_model.num_params()
    assert mem["params"] == mem["grads"] == 4 * n
    assert mem["optim"] == 0  # AdamW's state appears at the first step
    engine.optimizer_step(1e-3, 1.0)
    engine.micro_step(x, y, True)
    assert engine.memory_breakdown()["optim"] == 2 * 4 * n  # exp_avg + exp_avg_sq


def test_build_initialises_from_run_seed_and_loads_full_weights() -> None:
    engine, cfg = single_engine(1)
    model_cfg = GPTConfig(**cfg.model)
    ours = engine.raw_model.state_dict()
    for name, value in GPT(model_cfg, seed=cfg.run.seed).state_dict().items():
        assert torch.equal(ours[name], value), name
    assert engine.raw_model.lm_head.weight is engine.raw_model.transformer.wte.weight
    assert engine.num_params == GPT(model_cfg).num_params()

    weights = GPT(model_cfg, seed=5).state_dict()
    weights.pop("lm_head.weight")  # a tied matrix under one of its names is enough
    engine.load_model_weights(weights)
    for name, value in weights.items():
        assert torch.equal(engine.raw_model.state_dict()[name], value), name
    missing = {k: v for k, v in weights.items() if k != "transformer.ln_f.weight"}
    with pytest.raises(ValueError, match=r"missing \['transformer.ln_f.weight'\]"):
        engine.load_model_weights(missing)
    wrong = {**weights, "transformer.wpe.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="transformer.wpe.weight has shape"):
        engine.load_model_weights(wrong)
