"""MuonAdamW: torch.optim.Muon's math on the block matrices, AdamW's on the rest; its groups,
config, and the piece exchange that sharded strategies use (here at one rank; the 2-rank runs
are tests/distributed/test_muon_strategies.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from pretrain.config import ConfigError, MuonAdjustLR, OptimConfig
from pretrain.engine.matrices import MatrixPieces, MatrixSharding, row_pieces
from pretrain.model import GPT, GPTConfig
from pretrain.optim import AdamWL1, MuonAdamW, build_optimizer, muon_param_groups
from pretrain.optim.muon import assign_owners, orthogonalize_pieces, zeropower_via_newtonschulz
from tests.conftest import REPO


def tiny_gpt(tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, tie_embeddings=tie)
    )


def train(model: nn.Module, opts: list[torch.optim.Optimizer], steps: int) -> list[float]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        seq = torch.randint(0, 64, (4, 17), generator=g)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


def torch_reference(model: GPT, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """torch.optim.Muon on our Muon group, torch.optim.AdamW on the other two."""
    muon, *adamw = muon_param_groups(model, cfg)
    lr = cfg.lr if cfg.muon_lr is None else cfg.muon_lr
    return [
        torch.optim.Muon(
            muon["params"],
            lr=lr,
            weight_decay=muon["weight_decay"],
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            adjust_lr_fn=MuonAdjustLR(cfg.muon_adjust_lr).value,
        ),
        torch.optim.AdamW(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adamw],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
        ),
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"muon_adjust_lr": "original", "muon_lr": 0.02, "muon_weight_decay": 0.0},
        {"muon_nesterov": False, "muon_momentum": 0.9, "muon_ns_steps": 3},
    ],
)
def test_matches_torch_muon_and_adamw_bit_for_bit(overrides: dict[str, Any]) -> None:
    cfg = OptimConfig(name="muon", lr=3e-3, **overrides)  # type: ignore[arg-type]
    ours, ref = tiny_gpt(), tiny_gpt()
    got = train(ours, [build_optimizer(ours, cfg, torch.device("cpu"))], 6)
    want = train(ref, torch_reference(ref, cfg), 6)
    assert got == want
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    # ... and it is not AdamW (the comparison above would pass trivially if nothing moved).
    plain = tiny_gpt()
    adamw = train(plain, [AdamWL1(muon_param_groups(plain, cfg), lr=cfg.lr)], 6)
    assert adamw[-1] != got[-1]


def test_groups_muon_for_block_matrices_only() -> None:
    for tie in (True, False):
        model = tiny_gpt(tie)
        muon, decay, rest = muon_param_groups(model, OptimConfig(name="muon"))  # type: ignore[arg-type]
        names = {id(p): n for n, p in model.named_parameters()}
        muon_names = {names[id(p)] for p in muon["params"]}
        assert muon_names == {
            n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2
        }
        assert len(muon_names) == 8  # 4 per block: qkv, attention out, MLP in, MLP out
        others = {names[id(p)] for p in decay["params"] + rest["params"]}
        assert "transformer.wte.weight" in others and "transformer.wpe.weight" in others
        assert ("lm_head.weight" in others) == (not tie)
        assert not muon_names & others
        assert len(muon_names | others) == len(list(model.parameters()))
        assert (muon["kind"], decay["kind"], rest["kind"]) == ("muon", "adamw", "adamw")


def test_group_lrs_and_decays_are_configurable() -> None:
    cfg = OptimConfig(name="muon", lr=1e-3, weight_decay=0.05, muon_lr=0.02, l1=0.1)  # type: ignore[arg-type]
    muon, decay, rest = muon_param_groups(tiny_gpt(), cfg)
    assert muon["lr_scale"] == pytest.approx(20.0) and decay["lr_scale"] == 1.0
    assert muon["weight_decay"] == 0.05 == decay["weight_decay"] and rest["weight_decay"] == 0
    assert (muon["l1"], decay["l1"], rest["l1"]) == (0.1, 0.1, 0.0)
    cfg = OptimConfig(name="muon", weight_decay=0.05, muon_weight_decay=0.2)  # type: ignore[arg-type]
    assert muon_param_groups(tiny_gpt(), cfg)[0]["weight_decay"] == 0.2


def test_scheduled_lr_scales_the_muon_group_by_its_own_peak() -> None:
    """The engine sets one lr (the schedule's) on every group; Muon steps with lr * lr_scale, so
    halving the scheduled lr halves Muon's muon_lr: the same as torch Muon at muon_lr / 2."""
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, muon_adjust_lr="original")  # type: ignore[arg-type]
    ours, ref = tiny_gpt(), tiny_gpt()
    opt = build_optimizer(ours, cfg, torch.device("cpu"))
    for group in opt.param_groups:
        group["lr"] = cfg.lr / 2
    half = OptimConfig(name="muon", lr=cfg.lr / 2, muon_lr=0.01, muon_adjust_lr="original")  # type: ignore[arg-type]
    assert train(ours, [opt], 3) == train(ref, torch_reference(ref, half), 3)


def test_l1_thresholds_the_muon_matrices_too() -> None:
    cfg = OptimConfig(name="muon", lr=1e-2, l1=5.0)  # type: ignore[arg-type]
    model = tiny_gpt()
    train(model, [build_optimizer(model, cfg, torch.device("cpu"))], 3)
    muon = muon_param_groups(model, cfg)[0]["params"]
    assert all(float((p == 0).float().mean()) > 0.5 for p in muon)


def test_refuses_a_piece_of_a_matrix_without_sharding() -> None:
    flat = nn.Parameter(torch.randn(12))
    opt = MuonAdamW(
        [{**muon_param_groups(tiny_gpt(), OptimConfig(name="muon"))[0], "params": [flat]}],  # type: ignore[arg-type]
        lr=1e-3,
    )
    flat.grad = torch.randn(12)
    with pytest.raises(RuntimeError, match="no MatrixSharding"):
        opt.step()


@pytest.mark.parametrize(
    "bad",
    [{"muon_momentum": 1.0}, {"muon_ns_steps": 0}, {"muon_lr": -1.0}, {"muon_weight_decay": -0.1}],
)
def test_refuses_bad_muon_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="optim.muon_"):
        muon_param_groups(tiny_gpt(), OptimConfig(name="muon", **bad))  # type: ignore[arg-type]


def test_presets_compose_for_a_sweep_choice() -> None:
    """`optim=choice(adamw,muon)` picks a preset per trial: each composes into its optimizer."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for preset, kind in (("adamw", AdamWL1), ("muon", MuonAdamW)):
            cfg = compose(config_name="config", overrides=[f"optim={preset}"])
            opt = build_optimizer(tiny_gpt(), cfg.optim, torch.device("cpu"))
            assert type(opt) is kind and cfg.optim.name == preset


class OneRank(MatrixSharding):
    """A group of one: the exchange's plumbing without a process group."""

    def __init__(self, pieces: dict[int, list[MatrixPieces]]) -> None:
        super().__init__(0, 1, lambda held: pieces[id(held)])


def test_piece_exchange_reassembles_whole_matrices() -> None:
    """Two matrices held as pieces of one flat tensor (as a ZeRO partition holds them): the
    exchange orthogonalises each whole matrix and hands back each piece of the result."""
    a, b = torch.randn(6, 4), torch.randn(3, 5)
    flat = torch.cat([a.reshape(-1), b.reshape(-1)])
    plan = [
        MatrixPieces("a", (6, 4), (0,), (24,), 0),
        MatrixPieces("b", (3, 5), (0,), (15,), 24),
    ]
    mine = [flat.narrow(0, m.offset, m.numels[0]) for m in plan]

    def ns(u: torch.Tensor) -> torch.Tensor:
        return zeropower_via_newtonschulz(u, (3.4445, -4.7750, 2.0315), 5, 1e-7)

    got = orthogonalize_pieces(OneRank({}), plan, mine, ns)
    assert torch.equal(got[0], ns(a).reshape(-1)) and torch.equal(got[1], ns(b).reshape(-1))


def test_owners_balance_newton_schulz_cost_and_keep_whole_matrices_home() -> None:
    m = [row_pieces(f"m{i}", (64, 64), [(0, 32), (32, 32)]) for i in range(4)]
    assert sorted(assign_owners(m, 2)) == [0, 0, 1, 1]
    big = row_pieces("big", (256, 64), [(0, 128), (128, 128)])
    assert assign_owners([big, *m], 2) == [0, 1, 1, 1, 1]  # the large one alone on rank 0
    whole = MatrixPieces("w", (8, 8), (0, 0), (0, 64), 0)  # rank 1 holds it all
    assert assign_owners([whole], 2) == [1]


def test_plan_counts_one_momentum_for_the_muon_matrices() -> None:
    """The planner's saving (4 bytes per Muon element) is what the real optimizers hold: the
    state of MuonAdamW against AdamWL1's after one step, measured from the tensors."""
    from pretrain.plan.costs import model_states, optimizer_comm_bytes
    from pretrain.plan.sizes import model_sizes

    model = tiny_gpt()
    sizes = model_sizes(model.cfg)
    held = {}
    for name in ("adamw", "muon"):
        opt = build_optimizer(model, OptimConfig(name=name), torch.device("cpu"))  # type: ignore[arg-type]
        train(model, [opt], 1)
        held[name] = sum(
            v.numel() * v.element_size()
            for s in opt.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
    plan = {o: model_states("ddp", sizes, 2, "fp32", optimizer=o).optim for o in held}
    assert held["adamw"] == plan["adamw"] and held["muon"] == plan["muon"]
    assert plan["adamw"] - plan["muon"] == 4 * sizes.hidden_matrices > 0
    # Sharded: 4 bytes per Muon element a rank owns; and the exchange's traffic.
    z = {o: model_states("zero2", sizes, 4, "bf16", optimizer=o).optim for o in held}
    assert z["adamw"] - z["muon"] == 4 * -(-sizes.hidden_matrices // 4)
    assert optimizer_comm_bytes("ddp", sizes, 1, "muon") == 0
    assert optimizer_comm_bytes("fsdp", sizes, 4, "adamw") == 0
    assert optimizer_comm_bytes("fsdp", sizes, 4, "muon") == 3 * sizes.hidden_matrices * 6 // 16


def test_fp32_newton_schulz_is_the_bf16_one_more_precisely() -> None:
    """optim.muon_ns_dtype=fp32 runs the same iteration in fp32: the bf16 result within bf16's
    rounding, and an fp32 update."""
    u = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    coefficients = (3.4445, -4.7750, 2.0315)
    low = zeropower_via_newtonschulz(u, coefficients, 5, 1e-7)
    high = zeropower_via_newtonschulz(u, coefficients, 5, 1e-7, torch.float32)
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    torch.testing.assert_close(low.float(), high, rtol=0, atol=0.05)
    assert not torch.equal(low.float(), high)
    models = {}
    for dtype in ("bf16", "fp32"):
        cfg = OptimConfig(name="muon", lr=1e-2, muon_ns_dtype=dtype)  # type: ignore[arg-type]
        models[dtype] = tiny_gpt()
        opt = build_optimizer(models[dtype], cfg, torch.device("cpu"))
        assert opt.param_groups[0]["ns_dtype"] == dtype
        train(models[dtype], [opt], 3)
    w = {k: m.transformer.h[0].mlp.c_fc.weight.detach() for k, m in models.items()}
    assert not torch.equal(w["bf16"], w["fp32"])
    torch.testing.assert_close(w["bf16"], w["fp32"], rtol=0, atol=2e-3)


@pytest.mark.parametrize("ns_dtype", ["bf16", "fp32"])
def test_orthogonalising_leaves_the_momentum_alone(ns_dtype: str) -> None:
    """Without Nesterov the update is the momentum buffer itself: orthogonalising it (in fp32,
    where no cast copies it) must not rewrite the buffer. After one step from zero it is
    (1 - mu) x the gradient."""
    cfg = OptimConfig(name="muon", muon_nesterov=False, muon_ns_dtype=ns_dtype)  # type: ignore[arg-type]
    model = tiny_gpt()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    seq = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    model(seq[:, :-1], seq[:, 1:])[1].backward()
    p = opt.param_groups[0]["params"][0]
    grad = p.grad.clone()
    opt.step()
    torch.testing.assert_close(
        opt.state[p]["momentum_buffer"], (1 - cfg.muon_momentum) * grad, rtol=0, atol=0
    )
