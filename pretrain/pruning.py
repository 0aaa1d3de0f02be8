"""Pruning a GPT, and keeping pruned weights at zero while it trains.

Unstructured (`prune_unstructured`): the smallest-magnitude fraction of all block matmul weights
(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, ranked together: global magnitude pruning, with
torch.nn.utils.prune) is set to zero. The matrices keep their shapes: the file and the FLOPs do
not shrink (a dense kernel multiplies the zeros too), the parameters that matter do. The token
embedding and the output layer are left whole: they are one tied matrix in most models, and
they see every token.

Structured (`importance`, `select`, `prune_structured`): whole attention heads and MLP neurons are
removed, leaving a smaller dense model (narrower matrices: fewer FLOPs, a smaller file).

    a head     its q, k and v rows of attn.c_attn and its columns of attn.c_proj; with
               grouped-query attention (n_kv_head > 0) the unit is one query head from every
               key/value group (q rows and c_proj columns; the shared k and v stay), so every
               group keeps the same size
    a neuron   its row of mlp.c_fc (gelu) or its gate and up rows (swiglu), its column of
               mlp.c_proj

Importance is the first-order Taylor estimate of the loss change when a unit is removed
(Molchanov et al. 2019): a gate g = 1 multiplies each unit's output, and the score is the sum
over calibration batches of (dL/dg)^2. `select` removes, per layer, the lowest-scored fraction
of heads and of neurons (uniform: every layer keeps the same shape, so the model still maps to a
stock Hugging Face class), or the lowest-scored units over all layers at once (non-uniform:
layers keep what they need; at least one head and one neuron stay in every layer). A
non-uniform model is written with per-layer sizes (`GPTConfig.layer_heads`,
`GPTConfig.layer_mlp_hidden`), which our model and training run, and no stock HF config holds.

Keeping zeros while training (`keep_zeros`): a run started with `train.init_from` from an
unstructured-pruned model computes every pruned block matmul with `weight * mask` (the mask:
where the source's weight is exactly zero). So the gradient of a pruned weight is exactly zero
under every strategy (it is the forward's own arithmetic, wherever the strategy puts the full
weight), and an optimizer that does not move a zero weight with a zero gradient (AdamW, with
decoupled weight decay, from a fresh state, as `init_from` starts) leaves it at exactly zero,
master copies included. The mask is a non-persistent buffer: checkpoints keep their names, and a
resumed run takes the mask from the zeros of the checkpoint it resumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ConfigError
from pretrain.model import GPT, GPTConfig

BLOCK_MATMULS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
METHODS = ("unstructured", "structured", "structured-global")


class PruneError(ConfigError):
    """A pruning request that cannot be met; the message says why and what to do."""


def check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise PruneError(
            f"--prune {fraction}: the fraction to remove must be in (0, 1) (e.g. --prune 0.5 "
            "removes half of the block weights, or of the heads and MLP neurons)"
        )


def block_matmuls(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every block matmul: what pruning touches."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("transformer.h.") and n.endswith(BLOCK_MATMULS)
    ]


def zeros_in_blocks(model: nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for _, m in block_matmuls(model))


# ---------------------------------------------------------------------------------------------
# Unstructured
# ---------------------------------------------------------------------------------------------


def prune_unstructured(model: GPT, fraction: float) -> dict[str, Any]:
    """Zero the `fraction` of block matmul weights with the smallest magnitude, ranked over all
    blocks together; in place. Returns what was done, for the model's manifest."""
    from torch.nn.utils import prune

    check_fraction(fraction)
    targets = [(m, "weight") for _, m in block_matmuls(model)]
    with torch.no_grad():
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=fraction)
        for m, name in targets:
            prune.remove(m, name)  # weight_orig * weight_mask becomes the plain weight again
    total = sum(m.weight.numel() for m, _ in targets)
    return {
        "method": "unstructured",
        "fraction": fraction,
        "zeroed": zeros_in_blocks(model),
        "of": total,
        "scope": "block matmuls (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), ranked together",
    }


# ---------------------------------------------------------------------------------------------
# Structured: importance
# ---------------------------------------------------------------------------------------------


@dataclass
class Scores:
    heads: list[torch.Tensor]  # per layer: [heads_of(i)] query-head importance
    neurons: list[torch.Tensor]  # per layer: [mlp_hidden_of(i)] neuron importance
    batches: int = 0
    tokens: int = 0


def importance(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Scores:
    """Taylor importance of every query head and MLP neuron (see the module docstring) over
    `batches` of (inputs, targets) [B, T]. The model's weights are not changed."""
    cfg = model.cfg
    D = cfg.head_dim
    device = next(model.parameters()).device
    head_gates = [
        torch.ones(cfg.heads_of(i), device=device, requires_grad=True) for i in range(cfg.n_layer)
    ]
    neuron_gates = [
        torch.ones(cfg.mlp_hidden_of(i), device=device, requires_grad=True)
        for i in range(cfg.n_layer)
    ]

    def gate_heads(g: torch.Tensor) -> Any:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            y = args[0]  # [B, T, H*D]: the heads' outputs, side by side
            return ((y.unflatten(-1, (-1, D)) * g[:, None]).flatten(-2),)

        return hook

    def gate_neurons(g: torch.Tensor) -> Any:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (args[0] * g,)  # [B, T, hidden]

        return hook

    hooks = []
    for i, block in enumerate(model.transformer.h):
        hooks.append(block.attn.c_proj.register_forward_pre_hook(gate_heads(head_gates[i])))
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(gate_neurons(neuron_gates[i])))
    was_training = model.training
    wanted = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)  # only the gates' gradients are needed
    scores = Scores([torch.zeros_like(g) for g in head_gates],
                    [torch.zeros_like(g) for g in neuron_gates])  # fmt: skip
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits, _ = model(x)  # [B, T, V]
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
            grads = torch.autograd.grad(loss, head_gates + neuron_gates)
            for s, g in zip(scores.heads + scores.neurons, grads):
                s += g.detach() ** 2
            scores.batches += 1
            scores.tokens += int((y >= 0).sum())
    finally:
        for h in hooks:
            h.remove()
        for p, req in wanted:
            p.requires_grad_(req)
        model.train(was_training)
    if scores.batches == 0:
        raise PruneError("no calibration batches: structured pruning needs data to score units")
    return scores


# ---------------------------------------------------------------------------------------------
# Structured: which units go
# ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    heads: list[list[int]]  # per layer: the query heads kept, ascending
    neurons: list[list[int]]  # per layer: the neurons kept, ascending

    def uniform(self) -> bool:
        return len({len(h) for h in self.heads}) == 1 and len({len(n) for n in self.neurons}) == 1


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _head_slots(cfg: GPTConfig, layer: int, scores: torch.Tensor) -> list[tuple[float, list[int]]]:
    """The removable units of one layer's attention, (score, query heads), lowest first. MHA:
    one head each. GQA: slot j = the j-th least important query head of every group."""
    H = cfg.heads_of(layer)
    if cfg.n_kv_head == 0:
        order = torch.argsort(scores, stable=True).tolist()
        return [(float(scores[h]), [h]) for h in order]
    groups, size = cfg.n_kv_head, H // cfg.n_kv_head
    per_group = scores.view(groups, size)
    ranked = torch.argsort(per_group, dim=1, stable=True)  # [groups, size]
    slots = []
    for j in range(size):
        heads = [g * size + int(ranked[g, j]) for g in range(groups)]
        slots.append((float(sum(scores[h] for h in heads)), heads))
    return sorted(slots, key=lambda s: s[0])


def select(
    cfg: GPTConfig,
    scores: Scores,
    fraction: float,
    *,
    uniform: bool = True,
    heads: int | None = None,
) -> Selection:
    """Which heads and neurons stay. `fraction` of the head units and of the neurons go: per
    layer (uniform), or the lowest-scored over all layers (uniform=False). `heads`, when given,
    is the number of query heads each layer loses instead (uniform)."""
    check_fraction(fraction)
    L = cfg.n_layer
    slots = [_head_slots(cfg, i, scores.heads[i]) for i in range(L)]
    group = 1 if cfg.n_kv_head == 0 else cfg.n_kv_head  # query heads per unit
    if heads is not None:
        H = min(cfg.heads_of(i) for i in range(L))
        if heads < 0 or heads >= H:
            raise PruneError(
                f"--prune-heads {heads}: the model has {H} heads per layer and at least one "
                f"must stay: remove at most {H - 1} (0 = prune only MLP neurons)"
            )
        if heads % group:
            raise PruneError(
                f"--prune-heads {heads}: with n_kv_head={cfg.n_kv_head}, heads go one from "
                f"every key/value group at a time: remove a multiple of {group}"
            )
        drop_slots = [set(range(heads // group))] * L
    elif uniform:
        drop_slots = [set(range(_round(fraction * len(s)))) for s in slots]
    else:
        drop_slots = _global_drop([[sc for sc, _ in s] for s in slots], fraction)
    neuron_order = [torch.argsort(s, stable=True).tolist() for s in scores.neurons]
    if uniform or heads is not None:
        drop_neurons = [set(order[: _round(fraction * len(order))]) for order in neuron_order]
    else:
        dropped = _global_drop(
            [[float(scores.neurons[i][j]) for j in order] for i, order in enumerate(neuron_order)],
            fraction,
        )
        drop_neurons = [{order[k] for k in d} for order, d in zip(neuron_order, dropped)]
    for i in range(L):
        what = [
            (len(drop_slots[i]) * group, len(slots[i]) * group, "heads"),
            (len(drop_neurons[i]), len(neuron_order[i]), "MLP neurons"),
        ]
        for gone, have, unit in what:
            if gone >= have:
                raise PruneError(
                    f"--prune {fraction} would remove all {have} {unit} of layer {i} "
                    f"({have} x {fraction}, rounded): use a smaller fraction"
                )
    if all(not d for d in drop_slots) and all(not d for d in drop_neurons):
        raise PruneError(
            f"--prune {fraction} removes nothing from this model (every count rounds to 0): "
            "use a larger fraction"
        )
    kept_heads = [
        sorted(h for j, (_, hs) in enumerate(s) if j not in d for h in hs)
        for s, d in zip(slots, drop_slots)
    ]
    kept_neurons = [sorted(set(range(len(o))) - d) for o, d in zip(neuron_order, drop_neurons)]
    return Selection(kept_heads, kept_neurons)


def _global_drop(ranked: list[list[float]], fraction: float) -> list[set[int]]:
    """Per layer, the positions (into that layer's ascending list) of the units to drop: the
    lowest-scored `fraction` of all units of all layers, each layer keeping at least one."""
    pool = sorted((score, i, k) for i, layer in enumerate(ranked) for k, score in enumerate(layer))
    budget = _round(fraction * len(pool))
    drop: list[set[int]] = [set() for _ in ranked]
    for _, i, k in pool:
        if budget == 0:
            break
        if len(drop[i]) < len(ranked[i]) - 1:
            drop[i].add(k)
            budget -= 1
    return drop


# ---------------------------------------------------------------------------------------------
# Structured: the smaller model
# ---------------------------------------------------------------------------------------------


def pruned_config(cfg: GPTConfig, sel: Selection) -> GPTConfig:
    """The architecture after removing the units `sel` does not keep."""
    heads = [len(h) for h in sel.heads]
    hidden = [len(n) for n in sel.neurons]
    D = cfg.head_dim
    uniform = sel.uniform()
    n_head = max(heads)
    new = replace(
        cfg,
        n_head=n_head,
        head_size=0 if n_head * D == cfg.n_embd and uniform else D,
        mlp_hidden=max(hidden),
        layer_heads=[] if uniform else heads,
        layer_mlp_hidden=[] if uniform else hidden,
    )
    return new.validate()


@torch.no_grad()
def prune_structured(model: GPT, sel: Selection) -> GPT:
    """A new, smaller GPT holding `model`'s weights of the units `sel` keeps."""
    cfg = model.cfg
    new_cfg = pruned_config(cfg, sel)
    D, C = cfg.head_dim, cfg.n_embd
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        H, Hkv = cfg.heads_of(i), cfg.kv_heads_of(i)
        keep = torch.tensor(sel.heads[i])
        q_rows = (keep[:, None] * D + torch.arange(D)).flatten()  # [H' * D]
        if cfg.n_kv_head == 0:  # MHA: a head's k and v go with it
            kv_rows = torch.cat([H * D + q_rows, (H + Hkv) * D + q_rows])
        else:  # GQA: the shared key/value heads stay
            kv_rows = torch.arange(H * D, (H + 2 * Hkv) * D)
        rows = torch.cat([q_rows, kv_rows])
        for s in ("weight", "bias"):
            if p + f"attn.c_attn.{s}" in sd:
                sd[p + f"attn.c_attn.{s}"] = sd[p + f"attn.c_attn.{s}"][rows]
        sd[p + "attn.c_proj.weight"] = sd[p + "attn.c_proj.weight"][:, q_rows]
        hidden = cfg.mlp_hidden_of(i)
        n = torch.tensor(sel.neurons[i])
        fc_rows = torch.cat([n, hidden + n]) if cfg.mlp == "swiglu" else n
        for s in ("weight", "bias"):
            if p + f"mlp.c_fc.{s}" in sd:
                sd[p + f"mlp.c_fc.{s}"] = sd[p + f"mlp.c_fc.{s}"][fc_rows]
        sd[p + "mlp.c_proj.weight"] = sd[p + "mlp.c_proj.weight"][:, n]
    assert sd["transformer.wte.weight"].shape[1] == C
    with torch.device("meta"):
        small = GPT(new_cfg)
    small.load_state_dict(sd, assign=True, strict=True)
    if new_cfg.tie_embeddings:
        small.transformer.wte.weight = small.lm_head.weight
    return small.to(next(model.parameters()).device).eval()


def describe(cfg: GPTConfig, new: GPTConfig) -> dict[str, Any]:
    """Heads and neurons before and after, per layer, for the model's manifest."""
    return {
        "heads": [new.heads_of(i) for i in range(new.n_layer)],
        "heads_before": [cfg.heads_of(i) for i in range(cfg.n_layer)],
        "mlp_hidden": [new.mlp_hidden_of(i) for i in range(new.n_layer)],
        "mlp_hidden_before": [cfg.mlp_hidden_of(i) for i in range(cfg.n_layer)],
        "uniform": new.uniform,
    }


# ---------------------------------------------------------------------------------------------
# Keeping zeros while training
# ---------------------------------------------------------------------------------------------


class MaskedLinear(nn.Linear):
    """nn.Linear that computes with `weight * weight_mask`: the masked weights contribute
    nothing and get exactly zero gradient. `weight_mask` is a non-persistent buffer (the state
    dict is that of a plain Linear)."""

    weight_mask: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_mask, self.bias)


def keep_zeros(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> int:
    """Make every block matmul of `model` whose weight in `weights` (a full state dict: the
    run's source, or the checkpoint it resumes) has exact zeros compute with those entries
    masked (`MaskedLinear`), in place, whatever wraps `model`. Returns the number of masked
    weights (0: a dense source, nothing changed)."""
    masked = 0
    for name, module in block_matmuls(model):
        w = weights.get(name + ".weight")
        if w is None:
            continue
        mask = w != 0
        zeros = int(mask.numel() - mask.sum())
        if zeros == 0:
            continue
        device = module.weight.device if module.weight.device.type != "meta" else w.device
        module.__class__ = MaskedLinear
        module.register_buffer("weight_mask", mask.to(device), persistent=False)
        masked += zeros
    return masked
