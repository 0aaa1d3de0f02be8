"""The memory planner: ZeRO model-state formulas, activation inventory, recommendation, CLI."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Any

import pytest
import torch

from pretrain.config import STRATEGIES
from pretrain.model import GPT, GPTConfig
from pretrain.plan.costs import GB, activation_bytes, buffer_bytes, estimate, model_states
from pretrain.plan.recommend import COMM_ORDER, candidates, recommend
from pretrain.plan.sizes import ModelSizes, model_sizes
from tests.conftest import REPO, test_env

GPT2 = GPTConfig(vocab_size=50304)  # the defaults are GPT-2 small
LLAMA: dict[str, Any] = dict(
    n_kv_head=2,
    norm="rmsnorm",
    mlp="swiglu",
    pos_emb="rope",
    bias=False,
    tie_embeddings=False,
)


QWEN3: dict[str, Any] = dict(LLAMA, qk_norm=True, qkv_bias=True, head_size=32)
OPEN_PRESETS = ("llama3.2-1b", "llama3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "smollm2-135m")


def states_gb(strategy: str, psi: int, n: int, precision: str = "bf16", **kw) -> float:
    s = model_states(strategy, psi, n, precision, **kw)
    return (s.params + s.grads + s.optim) / GB


# -- model states: the ZeRO paper ------------------------------------------------------------


def test_zero_paper_figure1_example_7_5b_on_64_ranks():
    # Rajbhandari et al. 2019, figure 1: Ψ = 7.5B, N_d = 64, K = 12 (mixed-precision Adam).
    psi, n = 7_500_000_000, 64
    assert round(states_gb("ddp", psi, n), 1) == 120.0
    assert round(states_gb("zero1", psi, n), 1) == 31.4
    assert round(states_gb("zero2", psi, n), 1) == 16.6
    assert round(states_gb("zero3", psi, n), 1) == 1.9


def test_mixed_precision_breakdown_per_strategy():
    psi, n = 1_000_000_000, 64
    assert states_gb("ddp", psi, n) == 16.0  # 16Ψ bytes: Ψ = 1e9 -> 16 GB
    ddp = model_states("ddp", psi, n, "bf16")
    assert (ddp.params, ddp.grads, ddp.optim) == (4 * psi, 4 * psi, 8 * psi)  # fp32 + autocast
    z1 = model_states("zero1", psi, n, "bf16")
    assert (z1.params, z1.grads, z1.optim) == (2 * psi, 2 * psi, 12 * psi // n)
    z2 = model_states("zero2", psi, n, "bf16")
    assert (z2.params, z2.grads, z2.optim) == (2 * psi, 2 * psi // n, 12 * psi // n)
    z3 = model_states("zero3", psi, n, "bf16")
    assert (z3.params, z3.grads, z3.optim) == (2 * psi // n, 2 * psi // n, 12 * psi // n)
    # FSDP2: sharded fp32 params (the master copy) + sharded fp32 grads + sharded Adam.
    f = model_states("fsdp", psi, n, "bf16")
    assert (f.params, f.grads, f.optim) == (4 * psi // n, 4 * psi // n, 8 * psi // n)
    assert states_gb("fsdp", psi, n) == states_gb("zero3", psi, n) == 16 / n
    assert (
        states_gb("fsdp_grad_op", psi, n) == 16 / n
    )  # sharded states; unsharded params are buffers


def test_fp32_formulas():
    psi, n = 1_000_000_000, 8
    ddp = model_states("ddp", psi, n, "fp32")
    assert (ddp.params, ddp.grads, ddp.optim) == (4 * psi, 4 * psi, 8 * psi)  # no master copy
    f = model_states("fsdp", psi, n, "fp32")
    assert f.params + f.grads + f.optim == 16 * psi // n
    # DeepSpeed clones its fp32 partition even for an fp32 model (measured in
    # tests/distributed/test_plan_memory.py): 12 bytes of optimizer state per owned element.
    z2 = model_states("zero2", psi, n, "fp32")
    assert (z2.params, z2.grads, z2.optim) == (4 * psi, 4 * psi // n, 12 * psi // n)
    z3 = model_states("zero3", psi, n, "fp32")
    assert (z3.params, z3.grads, z3.optim) == (4 * psi // n, 4 * psi // n, 12 * psi // n)


def test_offload_moves_model_states_to_the_cpu():
    psi, n = 1_000_000_000, 8
    off = model_states("zero3_offload", psi, n, "bf16")
    assert (off.params, off.grads, off.optim) == (0, 0, 0)
    assert off.cpu_bytes == 20 * psi // n  # 2 params + 2 grads + 4 fp32 grads + 12 master/m/v
    keep = model_states("zero3_offload", psi, n, "bf16", offload_params=False)
    assert (keep.params, keep.cpu_bytes) == (2 * psi // n, 18 * psi // n)


def test_hsdp_shards_within_a_node():
    psi = 1_000_000_000
    assert states_gb("hsdp", psi, 16, nodes=2) == states_gb("fsdp", psi, 8) == 2.0
    assert states_gb("hsdp", psi, 16, nodes=1) == states_gb("fsdp", psi, 16)
    with pytest.raises(ValueError, match="divide world_size"):
        model_states("hsdp", psi, 16, "bf16", nodes=3)


def test_zero3_persistent_parameters_stay_whole():
    sizes = model_sizes(GPT2)
    small = sum(s[0] for s in sizes.shapes if len(s) == 1)  # biases and norm weights
    n = 8
    base = model_states("zero3", sizes, n, "bf16").params
    kept = model_states("zero3", sizes, n, "bf16", zero3_persistence_threshold=100_000).params
    # Every 1-D parameter of GPT-2 small is <= 1e5 elements; every matrix is larger.
    assert kept - base == 2 * small


def test_model_sizes_are_the_real_model():
    for cfg in (GPT2, GPTConfig(vocab_size=32000, **LLAMA)):
        with torch.device("meta"):
            model = GPT(cfg)
        sizes = model_sizes(cfg)
        assert sizes.total == model.num_params()
        assert sizes.block == sum(p.numel() for p in model.transformer.h[0].parameters())
        assert sizes.root == model.num_params() - cfg.n_layer * sizes.block
    assert model_sizes(GPT2).total == 124_475_904  # nanoGPT's GPT-2 small with vocab 50304


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown strategy 'zero4'"):
        estimate(GPT2, "zero4", 8, 1, 1024, "bf16", False)
    with pytest.raises(ValueError, match="unknown precision"):
        estimate(GPT2, "ddp", 8, 1, 1024, "int8", False)
    with pytest.raises(ValueError, match="longer than model.block_size"):
        estimate(GPT2, "ddp", 8, 1, 2048, "bf16", False)


# -- activations -----------------------------------------------------------------------------


def test_gpt2_layer_is_korthikanti_without_dropout_masks():
    # Korthikanti et al.: 34·s·b·h bytes per layer in 16-bit with flash attention, of which 2
    # are the residual dropout masks (dropout = 0 here): 32·s·b·h, plus per-token statistics
    # (log-sum-exp 4 bytes x heads, 2 x LayerNorm mean/rstd 8 bytes).
    s, b, h, a = 1024, 4, 768, 12

    def per_layer(flash: bool, **kw) -> int:
        one = GPTConfig(vocab_size=50304, n_layer=1, **kw)
        two = GPTConfig(vocab_size=50304, n_layer=2, **kw)
        return activation_bytes(two, b, s, "bf16", False, flash_attention=flash) - (
            activation_bytes(one, b, s, "bf16", False, flash_attention=flash)
        )

    stats = s * b * (4 * a + 16)
    assert per_layer(True) == 32 * s * b * h + stats
    # Without flash attention the softmax probabilities [b, a, s, s] are stored too (5·a·s/h
    # in the paper counts them, their dropout mask and the dropout output).
    assert per_layer(False) == 32 * s * b * h + 2 * a * s * s * b + stats
    assert per_layer(False, dropout=0.1) == (34 * s * b * h + 5 * a * s * s * b + stats)


def test_checkpointing_keeps_only_block_inputs():
    s, b = 1024, 8
    full = activation_bytes(GPT2, b, s, "bf16", False)
    ckpt = activation_bytes(GPT2, b, s, "bf16", True)
    assert ckpt < full
    # Each block keeps only its input: L x s x b x h 16-bit values, plus the head and the loss.
    assert ckpt >= GPT2.n_layer * s * b * GPT2.n_embd * 2


def test_the_loss_never_holds_the_logits():
    # The chunked loss holds one chunk of logits, never the [b, s, V] fp32 logits and their
    # gradient (16 bytes x V per token, 6.6 GB at b=8, s=1024, V=50304).
    from pretrain.model import LOSS_CHUNK_BYTES
    from pretrain.plan.costs import loss_bytes

    b, s, V, C = 8, 1024, GPT2.padded_vocab_size, GPT2.n_embd
    loss = loss_bytes(GPT2, b * s, 2, autocast_copies=False)
    assert loss < 16 * b * s * V / 10
    # What it does hold: the fp32 weight gradient, the hidden states' gradient, ~2 chunks.
    assert 4 * V * C + 2 * b * s * C < loss <= 4 * V * C + 2 * b * s * C + 4 * LOSS_CHUNK_BYTES


def _measure(cfg: GPTConfig, mode: str, ckpt: bool) -> int:
    """Peak bytes of everything but parameters and gradients during one forward + backward,
    from torch's MemTracker (every tensor's storage, tracked as it is allocated and freed)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = GPT(cfg)
    if mode == "cast":
        model = model.to(torch.bfloat16)
    model.activation_checkpointing = ckpt
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if mode == "autocast"
        else contextlib.nullcontext()
    )
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with autocast:
            _, loss = model(x, y)
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_kind = {str(k.value) if hasattr(k, "value") else str(k): v for k, v in peak.items()}
    return by_kind["Total"] - by_kind["Parameter"] - by_kind["Gradient"]


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize(
    "arch,mode",
    [
        ("gpt", "fp32"), ("gpt", "autocast"), ("gpt", "cast"), ("llama", "fp32"),
        ("llama", "cast"), ("qwen3", "fp32"), ("qwen3", "cast"),
    ],
)  # fmt: skip
def test_activation_estimate_matches_measured_peak(arch: str, mode: str, ckpt: bool):
    # fp32 = plain fp32; autocast = fp32 model under bf16 autocast (single/ddp); cast = bf16
    # model (DeepSpeed, FSDP's param_dtype). qwen3: q/k norm, q/k/v biases and heads twice as
    # wide as n_embd / n_head.
    kw = {"gpt": {}, "llama": LLAMA, "qwen3": QWEN3}[arch]
    cfg = GPTConfig(vocab_size=1024, n_layer=2, n_head=4, n_embd=64, block_size=128, **kw)
    measured = _measure(cfg, mode, ckpt)
    precision = "fp32" if mode == "fp32" else "bf16"
    est = activation_bytes(cfg, 2, 128, precision, ckpt, fp32_residual=mode != "cast")
    if mode == "autocast":
        # autocast's bf16 copies of the Linear weights, the planner's `buffers` for ddp.
        est += buffer_bytes("single", model_sizes(cfg), 1, "bf16")
    if ckpt:
        assert est == pytest.approx(measured, rel=0.15)
    else:
        assert est == pytest.approx(measured, rel=0.02)


# -- recommendation --------------------------------------------------------------------------


@pytest.mark.parametrize("budget_gb", [200.0, 14.0, 11.0, 8.0])
def test_recommends_the_cheapest_strategy_that_fits(budget_gb: float):
    cfg = GPTConfig(vocab_size=50304, n_layer=24, n_head=16, n_embd=1024)  # GPT-2 medium
    rec = recommend(cfg, 8, 4, 1024, "bf16", False, budget_gb)
    fits = [
        s
        for s in candidates(8)
        if estimate(cfg, s, 8, 4, 1024, "bf16", False).peak <= 0.9 * budget_gb * GB
    ]
    assert rec.strategy == (fits[0] if fits else None), rec.message
    if fits:
        assert rec.message.startswith(fits[0])


def test_candidates_follow_communication_order():
    assert candidates(8) == [
        "ddp",
        "zero1",
        "zero2",
        "fsdp_grad_op",
        "fsdp",
        "zero3",
        "zero3_offload",
    ]
    assert candidates(1)[0] == "single"
    assert "hsdp" in candidates(16, nodes=2)
    assert set(COMM_ORDER) == set(STRATEGIES)


def test_nothing_fits_explains_what_to_change():
    cfg = GPTConfig(vocab_size=50304, n_layer=48, n_head=25, n_embd=1600)  # GPT-2 XL
    rec = recommend(cfg, 8, 16, 1024, "bf16", False, 24.0)
    assert rec.strategy is None
    assert rec.message.startswith("nothing fits")
    # Each suggestion must really fit when followed.
    ac = recommend(cfg, 8, 16, 1024, "bf16", True, 24.0)
    if "activation_checkpointing=true" in rec.message:
        assert ac.strategy is not None
    assert "micro_batch" in rec.message
    mb = int(rec.message.split("micro_batch to ")[1].split()[0])
    with_ac = "with activation checkpointing" in rec.message.split("micro_batch to ")[1]
    assert recommend(cfg, 8, mb, 1024, "bf16", with_ac, 24.0).strategy is not None


def test_model_sizes_from_psi_is_one_flat_tensor():
    sizes = ModelSizes.from_psi(1000)
    assert sizes.total == 1000 and sizes.root == 1000


# -- the command line ------------------------------------------------------------------------


def _plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.plan", *args],
        cwd=REPO,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(150)
def test_cli_prints_a_table_and_a_recommendation():
    proc = _plan("model=gpt2-124m", "world_size=8", "device_memory_gb=16")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "124.5M parameters" in out
    rows = [
        line.split()[0]
        for line in out.splitlines()
        if line.split()[:1] and line.split()[0] in STRATEGIES
    ]
    assert rows == list(STRATEGIES)
    rec = recommend(GPT2, 8, 8, 1024, "bf16", False, 16.0)
    assert f"Recommendation: {rec.message}" in out
    assert rec.strategy is not None
    ddp = estimate(GPT2, "ddp", 8, 8, 1024, "bf16", False)
    ddp_row = next(line for line in out.splitlines() if line.startswith("ddp "))
    assert f"{ddp.total / GB:.2f}" in ddp_row.split()
    assert f"{ddp.phases['resume'].device / GB:.2f}" in ddp_row.split()


def test_cli_refuses_unknown_keys(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    # The CLI's own entry point, in this process (a subprocess would spend seconds importing).
    from hydra.core.global_hydra import GlobalHydra

    from pretrain.plan import cli

    try:
        for bad in ("world_sise=8", "model.n_layers=3", "model=gpt2-9b"):
            GlobalHydra.instance().clear()
            monkeypatch.setattr(sys, "argv", ["plan", "model=gpt2-124m", bad])
            with pytest.raises(SystemExit) as exit_info:
                cli.main()
            assert exit_info.value.code != 0
            assert bad.split("=")[0].split(".")[-1] in capsys.readouterr().err
    finally:
        GlobalHydra.instance().clear()  # leave no Hydra state to the next test


def test_presets_and_overrides_through_hydra():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from pretrain.plan.cli import plan_report, register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="pretrain", version_base=None):
        cfg = compose("plan", overrides=["model=gpt2-350m", "strategy=zero2", "precision=fp32"])
        assert (cfg.model.n_layer, cfg.model.n_embd) == (24, 1024)
        text, rec = plan_report(cfg)
        assert rec is None  # one strategy: its row, no recommendation
        assert "354.9M parameters" in text and "\nzero2 " in text
        cfg = compose("plan", overrides=["model=llama-160m", "model.n_layer=2", "vocab_size=32000"])
        assert (cfg.model.n_layer, cfg.model.mlp) == (2, "swiglu")
        text, rec = plan_report(cfg)
        assert "vocab 32000" in text and rec is not None


@pytest.mark.parametrize("name", OPEN_PRESETS)
def test_open_model_presets_are_planned_with_their_real_sizes(name: str):
    """The open-model presets as transformers builds them (on the meta device): the same
    parameters, per block too (q/k norm gains and q/k/v biases counted), and a 128k-152k
    vocabulary's embedding and loss in the memory figures."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from transformers import AutoModelForCausalLM

    from pretrain import hf
    from pretrain.model import LOSS_CHUNK_BYTES
    from pretrain.plan.cli import plan_report, register
    from pretrain.plan.costs import loss_bytes

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="pretrain", version_base=None):
            cfg = compose("plan", overrides=[f"model={name}", "seq_len=4096", "micro_batch=1"])
    finally:
        GlobalHydra.instance().clear()
    mc = GPTConfig.from_mapping(dict(cfg.model))
    with torch.device("meta"):
        theirs = AutoModelForCausalLM.from_config(hf.to_hf_config(mc, eos_id=0, pad_id=-1))
    sizes = model_sizes(mc)
    assert sizes.total == sum(p.numel() for p in theirs.parameters())
    assert sizes.block == sum(p.numel() for p in theirs.model.layers[0].parameters())
    V, C = mc.padded_vocab_size, mc.n_embd
    assert V >= 49152 and sizes.largest_param == V * C  # the embedding
    text, rec = plan_report(cfg)
    assert f"{sizes.total / 1e6:.1f}M parameters" in text and f"vocab {V}" in text
    assert rec is not None
    # The loss holds the [V, C] weight gradient (fp32, and a bf16 chunk's), the hidden states'
    # gradient and a chunk of V-wide logits: a few dozen rows at 128k-152k ids, never the
    # [tokens, V] logits.
    tokens = 4096
    loss = loss_bytes(mc, tokens, 2, autocast_copies=False)
    rows = LOSS_CHUNK_BYTES // (4 * mc.vocab_size)
    assert rows < tokens / 16
    grads = (4 + 2) * V * C + 2 * tokens * C
    assert grads + 4 * rows * V <= loss <= grads + 4 * LOSS_CHUNK_BYTES
    assert estimate(mc, "fsdp", 8, 1, tokens, "bf16", False).activations > loss


# -- phases: init, train, save, resume --------------------------------------------------------


def _llama(name: str) -> GPTConfig:
    import yaml

    preset = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    return GPTConfig(**{**preset, "vocab_size": 32000})


@pytest.mark.parametrize(
    "name,params", [("llama-7b", 6_738_415_616), ("llama-70b", 68_976_648_192)]
)
@pytest.mark.parametrize("gpus", [64, 512])
def test_sharded_runs_never_hold_the_model_at_init_save_or_resume(
    name: str, params: int, gpus: int
):
    """At 7B and 70B on 64 and 512 GPUs (8 per node): a sharded strategy's init, save and resume
    peaks per rank are its shards plus one parameter, far from the 12 bytes per parameter per
    rank of host memory that gathering full weights and moments at a checkpoint took."""
    cfg = _llama(name)
    sizes = model_sizes(cfg)
    assert sizes.total == params  # the presets are Llama-2's shapes
    gathered = 12 * params  # fp32 weights + 2 moments, whole, on every rank
    for strategy in ("zero3", "zero3_offload", "fsdp"):
        e = estimate(cfg, strategy, gpus, 1, 4096, "bf16", True, gpus // 8)
        one_param = 4 * sizes.largest_param
        for phase in ("init", "save", "resume"):
            peak = e.phases[phase]
            # Never more than the states over the shards (16 bytes per parameter; offloaded,
            # 20 on the host: an fp32 gradient copy too), plus the biggest single parameter
            # (computed whole for its initial value, or a piece of it staged to or from the
            # checkpoint) and DeepSpeed's buckets.
            states = (20 if strategy == "zero3_offload" else 16) * params / gpus
            bound = states + one_param + 2 * 4 * sizes.width**2 + 2**26
            assert peak.device <= bound, (strategy, phase, peak)
            assert peak.host <= bound, (strategy, phase, peak)
            assert peak.total < gathered / 20, (strategy, phase, peak)
        assert e.phases["save"].device <= e.phases["train"].device
    # Replicated DDP holds it all, by design: 16 bytes per parameter at save and resume.
    ddp = estimate(cfg, "ddp", gpus, 1, 4096, "bf16", True, gpus // 8)
    assert ddp.phases["save"].device >= 12 * params
    assert ddp.phases["resume"].device >= 16 * params


def test_the_plan_fits_only_what_every_phase_fits():
    # fits/recommendation look at the largest phase, not only at training.
    cfg = _llama("llama-7b")
    e = estimate(cfg, "ddp", 8, 1, 4096, "bf16", True)
    assert e.peak == max(p.device for p in e.phases.values()) >= e.total - e.activations
    assert e.phases["train"].device >= e.total
    rec = recommend(cfg, 64, 1, 4096, "bf16", True, 80.0, 8)
    chosen = estimate(cfg, rec.strategy, 64, 1, 4096, "bf16", True, 8)  # type: ignore[arg-type]
    assert chosen.peak <= 0.9 * 80 * GB
    assert f"{chosen.peak / GB:.2f} GB" in rec.message


@pytest.mark.timeout(150)
def test_cli_plans_70b_on_512_gpus():
    proc = _plan(
        "model=llama-70b", "vocab_size=32000", "world_size=512", "nodes=64",
        "micro_batch=1", "seq_len=4096", "activation_checkpointing=true",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "68976.6M parameters" in out
    header = next(line for line in out.splitlines() if line.startswith("strategy"))
    assert header.split()[-5:] == ["init", "save", "resume", "host", "fits"]
    e = estimate(_llama("llama-70b"), "zero3", 512, 1, 4096, "bf16", True, 64)
    row = next(line for line in out.splitlines() if line.startswith("zero3 "))
    for phase in ("init", "save", "resume"):
        assert f"{e.phases[phase].device / GB:.2f}" in row.split()
    assert "Recommendation: zero3" in out or "Recommendation: fsdp" in out
