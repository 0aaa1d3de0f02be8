"""Initial values of the parameters: a pure function of a seed and each parameter's name.

Every parameter's values depend on (seed, name, config) and nothing else: not on which
parameters were created before it, on which rank, or in which order. So a rank that holds only
a shard of a parameter can compute exactly what one process would (`initial_value`), at any
world size, and a model built on the meta device is initialised after `to_empty` the same way.

The rules are GPT-2's (`init_rules`); the network marks the projections that write into the
residual stream (`mark_residual_proj`), which get a smaller std.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

from pretrain.model.config import GPTConfig

# The attribute that flags a Linear writing into the residual stream (scaled init).
_RESIDUAL_PROJ = "residual_proj"


def mark_residual_proj(linear: nn.Linear) -> nn.Linear:
    """Flag `linear` as a projection that writes into the residual stream (attn.c_proj,
    mlp.c_proj): `init_rules` gives it init_std/sqrt(2*n_layer). Returns `linear`."""
    setattr(linear, _RESIDUAL_PROJ, True)
    return linear


def param_seed(seed: int, name: str) -> int:
    """The seed of parameter `name`'s initial values: a hash of the run seed and the name, so
    that a parameter's values depend on nothing else (not on which parameters were created
    before it, on which rank, or in which order)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_rules(model: nn.Module, cfg: GPTConfig) -> dict[str, tuple[str, float]]:
    """How each parameter of `model` (by name, a tied matrix once) starts: ("normal", std),
    ("zeros", 0) or ("ones", 0). GPT-2 init: every Linear/Embedding weight ~ N(0, init_std),
    biases 0, norms 1; the two projections that write into the residual stream in each block
    (attn.c_proj, mlp.c_proj) ~ N(0, init_std/sqrt(2*n_layer)), so the residual's variance
    does not grow with depth (2 residual additions per block)."""
    std = cfg.init_std
    resid_std = std / math.sqrt(2 * cfg.n_layer)
    rules: dict[str, tuple[str, float]] = {}
    for prefix, module in model.named_modules():
        for pname, _ in module.named_parameters(prefix=prefix, recurse=False):
            leaf = pname.rpartition(".")[2]
            if isinstance(module, (nn.Linear, nn.Embedding)) and leaf == "weight":
                s = resid_std if getattr(module, _RESIDUAL_PROJ, False) else std
                rules.setdefault(pname, ("normal", s))
            elif leaf == "bias":
                rules.setdefault(pname, ("zeros", 0.0))
            else:  # norm gains
                rules.setdefault(pname, ("ones", 0.0))
    # Keyed as named_parameters() names them: a tied matrix under its first name only.
    return {name: rules[name] for name, _ in model.named_parameters()}


def initial_value(model: nn.Module, cfg: GPTConfig, name: str, seed: int) -> torch.Tensor:
    """The initial value of parameter `name` of `model`: full shape, fp32, on the CPU, a pure
    function of (seed, name, config). A normal draw uses its own generator seeded by
    `param_seed(seed, name)`, so every rank of a sharded run can compute any parameter
    (and keep its shard) and get what a single process gets, at any world size."""
    table = model.__dict__.get("_init_table")
    if table is None:  # built once: names, rules and shapes do not change
        shapes = {n: p.shape for n, p in model.named_parameters()}
        table = {n: (*rule, shapes[n]) for n, rule in init_rules(model, cfg).items()}
        model.__dict__["_init_table"] = table
    kind, std, shape = table[name]
    if kind == "zeros":
        return torch.zeros(shape, device="cpu")
    if kind == "ones":
        return torch.ones(shape, device="cpu")
    g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
    return torch.empty(shape, device="cpu").normal_(0.0, std, generator=g)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: GPTConfig, seed: int | None = None) -> None:
    """Set every parameter of `model` to `initial_value(model, cfg, name, seed)` (None = a seed
    drawn from torch's global generator). Parameters on the meta device are skipped: a meta
    model is materialised with `to_empty(device=...)` and then initialised."""
    real = [(name, p) for name, p in model.named_parameters() if not p.is_meta]
    if not real:
        return  # a meta model: nothing to set, and torch's generator is left untouched
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), device="cpu").item())
    for name, p in real:
        p.copy_(initial_value(model, cfg, name, seed))
