"""AdamWL1: AdamW plus a decoupled soft-threshold on the weight-decayed group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.model import GPT, GPTConfig
from pretrain.optim import AdamWL1, param_groups


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        seq = torch.randint(0, 64, (4, 17), generator=g)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def names_by_group(model: GPT) -> tuple[set[str], set[str]]:
    decay_ids = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    decay = {n for n, p in model.named_parameters() if id(p) in decay_ids}
    return decay, {n for n, _ in model.named_parameters()} - decay


def test_groups_put_l1_where_weight_decay_is() -> None:
    model = tiny_gpt()
    decay, rest = names_by_group(model)
    assert decay and rest
    assert all(model.get_parameter(n).ndim >= 2 and "wpe" not in n for n in decay)
    assert all(model.get_parameter(n).ndim == 1 or "wpe" in n for n in rest)
    groups = param_groups(model, 0.1, l1=0.5)
    assert [(g["weight_decay"], g["l1"]) for g in groups] == [(0.1, 0.5), (0.0, 0.0)]


def test_l1_zero_is_adamw_bit_for_bit() -> None:
    a, b = tiny_gpt(), tiny_gpt()
    train(a, torch.optim.AdamW(param_groups(a, 0.1), lr=1e-2), 5)
    train(b, AdamWL1(param_groups(b, 0.1, l1=0.0), lr=1e-2), 5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_step_is_the_soft_threshold_and_spares_the_other_group() -> None:
    """With zero gradients and no weight decay AdamW moves nothing (m = v = 0), so one step is
    the L1 step alone: w - clamp(w, -lr*l1, lr*l1), which is sign(w) * max(|w| - lr*l1, 0)
    computed the same way (exact). Biases, norms and positions are not touched."""
    model = tiny_gpt()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, l1 = 1e-2, 1.5  # threshold 0.015, below and above the init scale (std 0.02)
    AdamWL1(param_groups(model, 0.0, l1=l1), lr=lr).step()
    decay, rest = names_by_group(model)
    t = lr * l1
    for n in decay:
        w = before[n]
        expect = torch.sign(w) * torch.clamp(w.abs() - t, min=0)
        got = model.get_parameter(n)
        torch.testing.assert_close(got, expect, rtol=0, atol=0)
        # Small weights became exact zeros; large ones moved toward zero by exactly t.
        assert (got[w.abs() <= t] == 0).all() and (w.abs() <= t).any()
        big = w.abs() > t
        assert big.any() and torch.equal(got[big].abs(), w[big].abs() - t)
    for n in rest:
        assert torch.equal(model.get_parameter(n), before[n]), n


def test_l1_group_changes_only_the_decay_group_relative_to_adamw() -> None:
    a, b = tiny_gpt(), tiny_gpt()
    train(a, AdamWL1(param_groups(a, 0.1, l1=0.0), lr=1e-2), 3)
    train(b, AdamWL1(param_groups(b, 0.1, l1=1.0), lr=1e-2), 3)
    decay, rest = names_by_group(a)
    # The no-decay group's first step sees the same gradients; later ones see gradients of a
    # sparser model, so compare what the L1 step itself does: zeros only in the decay group.
    assert all((b.get_parameter(n) == 0).float().mean() > 0.3 for n in decay)
    assert all((b.get_parameter(n) == 0).sum() == 0 for n in rest)
    assert all((a.get_parameter(n) == 0).sum() == 0 for n in decay)


def test_fused_step_skipped_by_grad_scaler_skips_the_shrinkage() -> None:
    """fp16 loss scaling with a fused AdamW: the scaler hands `found_inf` to the step, whose
    kernel skips the update; the L1 step must skip too (or weights would shrink every
    overflow step)."""
    model = tiny_gpt()
    opt = AdamWL1(param_groups(model, 0.1, l1=1.0), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))  # the scaler starts its scale on the first scaled loss
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**15  # the overflow was seen
    # A clean step shrinks.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    scaler.step(opt)
    decay_ids = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    shrunk = [
        p.abs().sum() < b.abs().sum()
        for p, b in zip(model.parameters(), before)
        if id(p) in decay_ids
    ]
    assert shrunk and all(shrunk)


def test_resume_keeps_configured_hyperparameters_and_loads_old_state() -> None:
    model = tiny_gpt()
    old = AdamWL1(param_groups(model, 0.1, l1=0.0), lr=1e-2)
    train(model, old, 2)
    saved = old.state_dict()
    for g in saved["param_groups"]:
        del g["l1"]  # a checkpoint from before the key existed
    new = AdamWL1(param_groups(model, 0.05, l1=0.3), lr=1e-2)
    new.load_state_dict(saved)
    assert [(g["weight_decay"], g["l1"]) for g in new.param_groups] == [(0.05, 0.3), (0.0, 0.0)]
    for p in model.parameters():  # the moments came along
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])


@pytest.mark.parametrize("bad", [-1.0])
def test_negative_l1_is_refused(bad: float) -> None:
    from hydra import compose, initialize_config_dir

    from pretrain.config import ConfigError, validate
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"optim.l1={bad}"])
    with pytest.raises(ConfigError, match="optim.l1=-1.0 must be 0"):
        validate(cfg)  # type: ignore[arg-type]
