"""Parameter counts the memory formulas need, read off the real model built on the meta device
(no memory, no compute): every parameter's shape, a block's, the largest module's, the Linear
weights autocast copies."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from pretrain.model import GPT, GPTConfig
from pretrain.optim.muon import is_hidden_matrix


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts the formulas need, read off the real model built on the meta device."""

    shapes: tuple[tuple[int, ...], ...]
    """Shape of every parameter (a tied matrix once)."""
    block: int
    """Parameters of one transformer block."""
    n_blocks: int
    """Number of blocks."""
    linear_weights: int
    """Elements of all nn.Linear weights (autocast keeps a 16-bit copy of each)."""
    largest_module: int
    """Parameters of the largest leaf module (the embedding, for GPT-2)."""
    head: int = 0
    """Elements of the output projection (an nn.Linear that autocast does not cast: the loss
    casts it itself, see `loss_bytes`)."""
    largest_param: int = 0
    """Elements of the largest parameter (what initialisation and checkpointing hold whole)."""
    width: int = 0
    """n_embd (DeepSpeed's buckets are sized from it, `zero_bucket_elements`)."""
    hidden_shapes: tuple[tuple[int, ...], ...] = ()
    """Shapes of the 2-D weights inside the blocks: the matrices optim=muon steps with Muon."""

    @property
    def hidden_matrices(self) -> int:
        """Ψ_M: elements of the Muon matrices."""
        return sum(math.prod(s) for s in self.hidden_shapes)

    @property
    def total(self) -> int:
        """Ψ."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def root(self) -> int:
        """Parameters outside the blocks: embeddings, final norm, untied output projection."""
        return self.total - self.n_blocks * self.block

    @classmethod
    def from_psi(cls, psi: int) -> ModelSizes:
        """Sizes of a model known only by its parameter count: one flat tensor, no blocks.
        Enough for the model-state formulas (the ZeRO paper's examples)."""
        return cls(
            shapes=((int(psi),),),
            block=0,
            n_blocks=0,
            linear_weights=int(psi),
            largest_module=int(psi),
            largest_param=int(psi),
        )


def _key(cfg: GPTConfig) -> tuple[Any, ...]:
    """`cfg` as a hashable tuple (per-layer width lists as tuples) for the cache below."""
    values = (getattr(cfg, f.name) for f in fields(cfg))
    return tuple(tuple(v) if isinstance(v, list) else v for v in values)


@lru_cache(maxsize=64)
def _sizes(key: tuple[Any, ...]) -> ModelSizes:
    args: list[Any] = [list(v) if isinstance(v, tuple) else v for v in key]
    cfg = GPTConfig(*args)
    with torch.device("meta"):
        model = GPT(cfg)
    shapes = tuple(tuple(p.shape) for p in model.parameters())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    seen: set[int] = set()
    linear = 0
    largest = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False)]
        largest = max(largest, sum(p.numel() for p in own))
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            linear += module.weight.numel()
    head = model.lm_head.weight.numel()
    largest_param = max(math.prod(sh) for sh in shapes)
    hidden = tuple(tuple(p.shape) for n, p in model.named_parameters() if is_hidden_matrix(n, p))
    return ModelSizes(
        shapes, block, cfg.n_layer, linear, largest, head, largest_param, cfg.n_embd, hidden
    )


def model_sizes(cfg: GPTConfig) -> ModelSizes:
    """Exact parameter counts of `GPT(cfg)` (built on the meta device: no memory, no compute)."""
    cfg.validate()
    return _sizes(_key(cfg))
