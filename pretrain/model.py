"""The GPT model: one readable file, pure PyTorch.

By default this is GPT-2 (Radford et al. 2019) as in nanoGPT: learned absolute positions,
pre-LayerNorm blocks with biases, a tanh-approximated GELU MLP of width 4*d and an output
projection tied to the token embedding. Configuration switches turn on the Llama-style
options: rotary position embeddings (RoPE), RMSNorm, a SwiGLU MLP, no biases, grouped-query
attention (GQA, fewer key/value heads than query heads) and an untied output projection.

Shapes in comments: B = batch, T = sequence length (this chunk), S = key length (T, or the
cache fill plus T when decoding), C = n_embd, H = n_head, Hkv = n_kv_head (of the block: a
pruned model may have other counts per layer), D = head_dim = C/H (or model.head_size),
V = padded vocabulary size.

Layout of the parameters (stable names, used by checkpoint export and by the parallelism layer,
which wraps `transformer.h[i]` blocks without the model knowing):

    transformer.wte            token embedding             [V, C]
    transformer.wpe            position embedding          [block_size, C]   (learned only)
    transformer.h.{i}.ln_1     norm before attention
    transformer.h.{i}.attn.c_attn   fused q|k|v projection [(H + 2*Hkv) * D, C]
    transformer.h.{i}.attn.c_proj   attention output       [C, H * D]  (H * D = C unless heads
                                                            were pruned away)
    transformer.h.{i}.ln_2     norm before the MLP
    transformer.h.{i}.mlp.c_fc      MLP input    [4C, C] (gelu) or [2*hidden, C] = gate|up (swiglu)
    transformer.h.{i}.mlp.c_proj    MLP output   [C, hidden]
    transformer.ln_f           final norm
    lm_head                    output projection [V, C] (the same tensor as wte when tied)

Vocabulary padding: the embedding and output matrices have `padded_vocab_size` rows (a multiple
of `pad_vocab_to`, for fast matmuls). The logits of the padded ids are set to -inf in `forward`,
so the softmax, the loss and sampling are exactly those of a `vocab_size`-way model: padded ids
never get probability, their rows never get gradient from the loss, and an export can drop
them without changing any output.

The training loss (`forward(idx, targets)`) never materialises the [B, T, V] fp32 logits: the
output projection computes the cross-entropy and its gradient a chunk of positions at a time
(`LMHead`, `chunked_cross_entropy`). `forward(idx)` returns the full logits, as always.

Initialisation is a pure function of a seed and each parameter's name (`initial_value`), so a
rank that holds only a shard of a parameter can compute exactly what one process would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POS_EMBS = ("learned", "rope")
# SwiGLU hidden width is rounded up to a multiple of this (see GPTConfig.mlp_hidden_size).
SWIGLU_MULTIPLE_OF = 64


@dataclass
class GPTConfig:
    """Architecture of a GPT. Also the Hydra structured config of the `model` group: every
    field has a default (plain str/int/float/bool, two int lists), so presets only list what
    they change."""

    vocab_size: int = 0
    """Vocabulary size of the tokenizer; 0 = take it from the data manifest (filled in before
    the model is built; the model refuses 0)."""
    block_size: int = 1024
    """Maximum sequence length: size of the learned position table, longest RoPE position."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of query heads; n_embd must be divisible by it (head_dim = n_embd / n_head)."""
    n_kv_head: int = 0
    """Number of key/value heads; 0 = n_head (plain multi-head attention), fewer = GQA."""
    n_embd: int = 768
    """Residual stream width (model dimension)."""
    mlp_hidden: int = 0
    """MLP hidden width; 0 = 4*n_embd for gelu, 8/3*n_embd rounded up to a multiple of 64 for
    swiglu (same parameter count as a 4x GELU MLP, as in Llama)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorm (GPT-2: True; Llama: False)."""
    norm: str = "layernorm"
    """Normalisation layer: "layernorm" or "rmsnorm"."""
    mlp: str = "gelu"
    """MLP type: "gelu" (GPT-2, tanh approximation) or "swiglu" (Llama)."""
    pos_emb: str = "learned"
    """Position encoding: "learned" (absolute table) or "rope" (rotary, on q and k)."""
    rope_theta: float = 10000.0
    """RoPE base: frequencies are rope_theta ** (-2i / head_dim)."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the output projection."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm/RMSNorm."""
    init_std: float = 0.02
    """Std of the normal init of weights; residual projections get init_std/sqrt(2*n_layer)."""
    pad_vocab_to: int = 64
    """Round the embedding/output rows up to a multiple of this (1 = no padding). Padded logits
    are masked to -inf, so they never carry probability."""
    head_size: int = 0
    """Channels per attention head; 0 = n_embd / n_head. A model whose heads were pruned away
    keeps its head size with fewer heads (n_head * head_size < n_embd)."""
    layer_heads: list[int] = field(default_factory=list)
    """Query heads of each block, one entry per layer (empty = n_head in every layer): a model
    pruned to different shapes per layer. Each entry is a multiple of the key/value heads."""
    layer_mlp_hidden: list[int] = field(default_factory=list)
    """MLP hidden width of each block, one entry per layer (empty = mlp_hidden_size in every
    layer)."""

    # -- derived sizes (properties, not fields: Hydra ignores them) ---------------------------

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_head, or n_head when 0)."""
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    def heads_of(self, layer: int) -> int:
        """Query heads of block `layer`."""
        return self.layer_heads[layer] if self.layer_heads else self.n_head

    def kv_heads_of(self, layer: int) -> int:
        """Key/value heads of block `layer` (n_kv_head, or its query heads when 0)."""
        return self.n_kv_head or self.heads_of(layer)

    def mlp_hidden_of(self, layer: int) -> int:
        """MLP hidden width of block `layer`."""
        return self.layer_mlp_hidden[layer] if self.layer_mlp_hidden else self.mlp_hidden_size

    @property
    def uniform(self) -> bool:
        """Whether every block has the same shape (no per-layer lists)."""
        return not self.layer_heads and not self.layer_mlp_hidden

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output matrices: vocab_size rounded up to pad_vocab_to."""
        m = max(1, self.pad_vocab_to)
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def mlp_hidden_size(self) -> int:
        """MLP hidden width after resolving mlp_hidden = 0.

        gelu: 4*n_embd (GPT-2). swiglu: SwiGLU has three matrices instead of two, so Llama
        shrinks the width to 2/3 * 4*n_embd to keep the parameter count of a 4x MLP, then rounds
        up for fast matmuls. Llama rounds to 256; we round to 64, which is just as friendly to
        tensor cores but does not inflate small models (n_embd=128: 384 instead of 512)."""
        if self.mlp_hidden > 0:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            hidden = int(2 * 4 * self.n_embd / 3)
            return SWIGLU_MULTIPLE_OF * math.ceil(hidden / SWIGLU_MULTIPLE_OF)
        return 4 * self.n_embd

    def validate(self, require_vocab: bool = True) -> GPTConfig:
        """Raise ValueError naming the bad field and the fix; return self when all is well.

        `require_vocab=False` checks everything but vocab_size, for configs whose vocabulary is
        filled in from the data later."""
        errors: list[str] = []
        if require_vocab and self.vocab_size <= 0:
            errors.append(
                f"model.vocab_size is {self.vocab_size}: set it to the tokenizer's vocabulary "
                "size (model.vocab_size=N), or leave it 0 in the config and let the training "
                "loop fill it in from the data manifest before the model is built"
            )
        if self.vocab_size < 0:
            errors.append(f"model.vocab_size must be >= 0, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                errors.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.head_size < 0:
            errors.append(
                f"model.head_size must be >= 0 (0 = n_embd / n_head), got {self.head_size}"
            )
        elif self.head_size == 0 and self.n_head > 0 and self.n_embd % self.n_head != 0:
            errors.append(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "choose n_head dividing n_embd (head_dim = n_embd / n_head)"
            )
        for name in ("layer_heads", "layer_mlp_hidden"):
            values = list(getattr(self, name))
            if values and (len(values) != self.n_layer or min(values) <= 0):
                errors.append(
                    f"model.{name}={values} must hold one positive entry per layer "
                    f"(n_layer={self.n_layer}), or be empty (the same in every layer)"
                )
        if self.n_kv_head > 0 and any(h % self.n_kv_head for h in self.layer_heads):
            errors.append(
                f"model.layer_heads={list(self.layer_heads)}: every entry must be a multiple of "
                f"model.n_kv_head={self.n_kv_head} (each key/value head serves a whole group)"
            )
        if self.n_kv_head < 0:
            errors.append(f"model.n_kv_head must be >= 0 (0 = n_head), got {self.n_kv_head}")
        elif self.n_head > 0 and (self.kv_heads > self.n_head or self.n_head % self.kv_heads != 0):
            errors.append(
                f"model.n_head={self.n_head} is not a multiple of model.n_kv_head="
                f"{self.n_kv_head}: grouped-query attention shares each key/value head among "
                "n_head/n_kv_head query heads, so pick n_kv_head dividing n_head (0 = n_head)"
            )
        if self.mlp_hidden < 0:
            errors.append(
                f"model.mlp_hidden must be >= 0 (0 = default rule), got {self.mlp_hidden}"
            )
        if self.norm not in NORMS:
            errors.append(f"model.norm={self.norm!r} is not one of {NORMS}")
        if self.mlp not in MLPS:
            errors.append(f"model.mlp={self.mlp!r} is not one of {MLPS}")
        if self.pos_emb not in POS_EMBS:
            errors.append(f"model.pos_emb={self.pos_emb!r} is not one of {POS_EMBS}")
        if (
            self.pos_emb == "rope"
            and self.n_head > 0
            and (self.head_size > 0 or self.n_embd % self.n_head == 0)
            and self.head_dim % 2 != 0
        ):
            errors.append(
                f"RoPE rotates pairs of channels, so head_dim (head_size, or n_embd/n_head) must "
                f"be even; got {self.head_dim} (n_embd={self.n_embd}, n_head={self.n_head})"
            )
        if self.pos_emb == "rope" and self.rope_theta <= 0:
            errors.append(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            errors.append(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            errors.append(f"model.init_std must be > 0, got {self.init_std}")
        if self.pad_vocab_to < 1:
            errors.append(
                f"model.pad_vocab_to must be >= 1 (1 = no padding), got {self.pad_vocab_to}"
            )
        if errors:
            raise ValueError("invalid model config:\n  - " + "\n  - ".join(errors))
        return self

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> GPTConfig:
        """Build from a dict or an OmegaConf DictConfig (anything with .keys()/[]), with a clear
        error for unknown keys instead of a bare TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(m.keys()) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**{k: m[k] for k in m})


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight. No mean subtraction, no bias.

    Computed in float32 and cast back: the mean of squares of bf16 activations loses precision,
    and autocast does not upcast a hand-written norm for us."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings at the given integer positions.

    positions: [T] -> cos, sin: [T, D] in float32 (each frequency repeated for both halves,
    matching `apply_rope`'s rotate-half layout).

    Computed on the fly each forward instead of stored as buffers: the cost is a [T, D/2] outer
    product (negligible next to the matmuls), and it avoids two classic bugs with buffers:
    `model.to(bfloat16)` (DeepSpeed/FSDP casting the module) would round the angles of late
    positions to bf16, and a model built on the meta device would need them recomputed."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )  # [D/2]
    angles = torch.outer(positions.float(), inv_freq)  # [T, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of q or k by position-dependent angles.

    x: [B, nh, T, D], cos/sin: [T, D]. This is the "rotate half" (GPT-NeoX / Hugging Face Llama)
    layout, so an export to Hugging Face Llama needs no permutation of q/k weights. Done in
    float32 for the same precision reason as the tables."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # [B, nh, T, D/2] each
    rotated = torch.cat((-x2, x1), dim=-1)  # [B, nh, T, D]
    return (xf * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of every layer for incremental decoding.

    k[i], v[i]: [B, Hkv, max_len, D], allocated on first use with the dtype/device of the keys
    (so the cache follows autocast). `pos` is how many positions are filled; GPT.forward writes
    the new chunk at [pos, pos + T) in every layer and then advances pos by T. Only the Hkv
    key/value heads are stored, which is where GQA saves memory."""

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.pos = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, Hkv, T, D]) at positions [pos, pos + T) of `layer`; return all keys
        and values so far ([B, Hkv, pos + T, D])."""
        B, Hkv, T, D = k.shape
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(
                f"KV cache is full: {self.pos} positions filled, {T} more do not fit in "
                f"max_len={self.max_len}"
            )
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, Hkv, self.max_len, D)
            self.v[layer] = v.new_zeros(B, Hkv, self.max_len, D)
        ck, cv = self.k[layer], self.v[layer]
        assert ck is not None and cv is not None
        ck[:, :, self.pos : end] = k
        cv[:, :, self.pos : end] = v
        return ck[:, :, :end], cv[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.heads_of(layer_idx)
        self.n_kv_head = cfg.kv_heads_of(layer_idx)
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        # One fused projection for q, k and v (one matmul instead of three). Output rows are laid
        # out [q: H*D | k: Hkv*D | v: Hkv*D]; with Hkv = H this is exactly GPT-2's c_attn.
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_proj = True  # type: ignore[assignment]  # scaled init, see GPT
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
        if rope is not None:
            cos, sin = rope  # [T, D], already at the absolute positions of this chunk
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, Hkv, S, D], S = start + T

        # Masking. Without a cache (or when filling an empty one) q and k cover the same
        # positions and is_causal=True is the fused lower-triangular mask. Decoding one token
        # needs no mask: it may see every cached key. A chunk of T > 1 queries after a non-empty
        # cache needs an explicit mask, because SDPA's is_causal aligns the triangle to the
        # top-left corner, i.e. it would assume the queries start at position 0.
        attn_mask = None
        is_causal = start == 0 and T > 1
        if start > 0 and T > 1:
            q_pos = torch.arange(start, start + T, device=x.device)[:, None]  # [T, 1]
            k_pos = torch.arange(start + T, device=x.device)[None, :]  # [1, S]
            attn_mask = k_pos <= q_pos  # [T, S], True = may attend
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            # GQA: SDPA broadcasts each of the Hkv key/value heads to H/Hkv query heads itself,
            # without materialising repeated k/v.
            enable_gqa=Hkv != H,
        )  # [B, H, T, D]
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # re-assemble heads: [B, T, H*D]
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden_of(layer_idx)
        # SwiGLU needs two input projections (gate and up); they are fused into one matmul with
        # output rows laid out [gate: hidden | up: hidden].
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_proj = True  # type: ignore[assignment]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # [B, T, hidden] or [B, T, 2*hidden]
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # [B, T, hidden]
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU is the tanh approximation
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg, layer_idx)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------------------------
# Output projection and loss
# ---------------------------------------------------------------------------------------------

# Rows of fp32 logits the loss computes at once: about this many bytes of [rows, V] logits.
LOSS_CHUNK_BYTES = 32 * 2**20


class LMHead(nn.Linear):
    """The output projection (weight [V, C], no bias) and the training loss computed from it.

    `head(x)` is the plain projection: logits [..., V]. `head(x, targets)` is the mean
    cross-entropy over the non-ignored targets, computed `LOSS_CHUNK_BYTES` of logits at a time
    (`chunked_cross_entropy`), so that the [B, T, V] fp32 logits and their gradient never exist
    at once. Both go through the module's __call__, so sharding hooks (FSDP, DeepSpeed ZeRO-3)
    gather the weight for either."""

    def __init__(self, n_embd: int, padded_vocab: int, vocab_size: int) -> None:
        super().__init__(n_embd, padded_vocab, bias=False)
        self.vocab_size = vocab_size
        self.chunk_bytes = LOSS_CHUNK_BYTES

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        rows = max(1, self.chunk_bytes // (4 * self.vocab_size))
        return chunked_cross_entropy(
            x.reshape(-1, x.size(-1)), self.weight, targets.reshape(-1), self.vocab_size, rows
        )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the projection's matmul runs in: autocast's when it is on (as for an
    nn.Linear under autocast), else the inputs' (promoted)."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.result_type(*tensors)


def _chunked_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab: int,
    rows: int,
    grad_x_needed: bool,
    grad_w_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(sum of the losses, its gradient wrt x, wrt weight, number of non-ignored targets),
    `rows` rows of logits at a time; see `_ChunkedCrossEntropy`."""
    dtype = _compute_dtype(x, weight)
    xc = x.to(dtype)
    w = weight[:vocab].to(dtype)  # [V, C]; padded rows take no part (their logits are -inf)
    grad_x = torch.empty_like(xc) if grad_x_needed else None
    grad_w = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if grad_w_needed
        else None
    )
    # The weight gradient of one chunk, in the compute dtype, before it is added to the fp32
    # sum (one buffer for all chunks; fp32 needs none: addmm_ accumulates in place).
    chunk_w = torch.empty_like(w) if grad_w is not None and dtype != torch.float32 else None
    valid = targets != -1
    safe = targets.clamp(min=0)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.size(0), rows):
        end = min(start + rows, x.size(0))
        logits = (xc[start:end] @ w.T).float()  # [n, V]
        lse = torch.logsumexp(logits, dim=-1)  # [n]
        t, m = safe[start:end], valid[start:end]
        picked = logits.gather(1, t[:, None]).squeeze(1)  # [n]
        total += torch.where(m, lse - picked, 0.0).sum()
        if grad_x is None and grad_w is None:
            continue
        # d(sum of losses) / d(logits) = softmax - onehot(target), zero on ignored rows.
        g = logits.sub_(lse[:, None]).exp_()  # in place: the chunk's logits are done with
        g.scatter_add_(1, t[:, None], torch.full_like(lse[:, None], -1.0))
        g.mul_(m[:, None])
        gc = g.to(dtype)
        if grad_x is not None:
            torch.matmul(gc, w, out=grad_x[start:end])  # [n, C]
        if grad_w is not None:
            if chunk_w is None:
                grad_w[:vocab].addmm_(gc.T, xc[start:end])  # [V, C]
            else:
                torch.matmul(gc.T, xc[start:end], out=chunk_w)
                grad_w[:vocab].add_(chunk_w)
    return total, grad_x, grad_w, valid.sum()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = x @ weight[:vocab].T over the targets != -1, one chunk of
    rows at a time. The gradient is computed in the forward pass, where each chunk's softmax is
    at hand (no second logits matmul): the backward only scales it. Memory beyond the inputs:
    one chunk's logits and softmax ([rows, V] fp32), the gradient of x ([N, C]) and the fp32
    gradient of the weight ([V_padded, C]); never the [N, V] logits or their gradient.

    Numerics follow the unchunked `F.cross_entropy((x @ W.T).float())`: the matmuls run in the
    compute dtype (bf16 under autocast, as nn.Linear does), logits and softmax in fp32, the
    gradient of the logits is cast to the compute dtype for the two backward matmuls, and the
    weight gradient accumulates in fp32. That gradient is taken unnormalised (softmax - onehot,
    in [-1, 1]) and scaled by grad / n_valid afterwards, in fp32, so fp16 cannot underflow it."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,  # [N, C]
        weight: torch.Tensor,  # [V_padded, C]
        targets: torch.Tensor,  # [N], -1 = ignore
        vocab: int,
        rows: int,
    ) -> torch.Tensor:
        total, grad_x, grad_w, n_valid = _chunked_loss(
            x, weight, targets, vocab, rows, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        # On ctx, not saved tensors: nothing is needed again but these results, and a gradient
        # no one else references is handed to .grad without a copy.
        ctx.grads = (grad_x, grad_w, n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_x, grad_w, n_valid = ctx.grads
        del ctx.grads
        scale = grad.float() / n_valid
        if grad_x is not None:
            grad_x = grad_x.mul_(scale) if grad_x.dtype == torch.float32 else grad_x.float() * scale
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(scale).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None


def chunked_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int, rows: int
) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight[:vocab].T ([N, C] @ [C, V]) against targets
    ([N], -1 = ignored), `rows` rows of logits at a time: the value and gradients of
    `F.cross_entropy` over the full fp32 logits with the padded ids at -inf, up to the order of
    summation, without ever holding more than `rows` rows of logits."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(x, weight, targets, vocab, rows)
    total, _, _, n_valid = _chunked_loss(x, weight, targets, vocab, rows, False, False)
    return total / n_valid


def param_seed(seed: int, name: str) -> int:
    """The seed of parameter `name`'s initial values: a hash of the run seed and the name, so
    that a parameter's values depend on nothing else (not on which parameters were created
    before it, on which rank, or in which order)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class GPT(nn.Module):
    activation_checkpointing: bool = False
    """When True (and training with grad enabled), each block's activations are recomputed in
    the backward pass instead of stored: ~1/3 more compute for much less activation memory."""

    def __init__(
        self, cfg: GPTConfig | Mapping[str, Any], seed: int | None = None, *, init: bool = True
    ) -> None:
        """The model of `cfg`, initialised from `seed` (see `init_weights`; None = a seed drawn
        from torch's global generator, so `torch.manual_seed(s); GPT(cfg)` is reproducible).
        On the meta device, or with init=False, the weights are left for the caller to set
        (a parallel engine initialises each rank's shard itself)."""
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            cfg = GPTConfig.from_mapping(cfg)
        cfg.validate()
        self.cfg = cfg
        self.activation_checkpointing = False

        V = cfg.padded_vocab_size
        wte = nn.Embedding(V, cfg.n_embd)
        lm_head = LMHead(cfg.n_embd, V, cfg.vocab_size)
        if cfg.tie_embeddings:
            # Weight tying (Press & Wolf 2017): one [V, C] matrix embeds tokens and scores them.
            # It is registered under both names (state_dict has both keys); parameters() and
            # named_parameters() yield it once, as transformer.wte.weight.
            wte.weight = lm_head.weight
        modules: dict[str, nn.Module] = {"wte": wte}
        if cfg.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        modules["drop"] = nn.Dropout(cfg.dropout)
        modules["h"] = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        modules["ln_f"] = make_norm(cfg)
        # Typed Any so that attribute access (self.transformer.h, .wte, ...) type-checks the
        # way it reads; it is an nn.ModuleDict.
        self.transformer: Any = nn.ModuleDict(modules)
        self.lm_head = lm_head
        if init:
            self.init_weights(seed)

    # -- initialisation ------------------------------------------------------------------------

    def init_rules(self) -> dict[str, tuple[str, float]]:
        """How each parameter (by name, a tied matrix once) starts: ("normal", std), ("zeros",
        0) or ("ones", 0). GPT-2 init: every Linear/Embedding weight ~ N(0, init_std), biases 0,
        norms 1; the two projections that write into the residual stream in each block
        (attn.c_proj, mlp.c_proj) ~ N(0, init_std/sqrt(2*n_layer)), so the residual's variance
        does not grow with depth (2 residual additions per block)."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        rules: dict[str, tuple[str, float]] = {}
        for prefix, module in self.named_modules():
            for pname, _ in module.named_parameters(prefix=prefix, recurse=False):
                leaf = pname.rpartition(".")[2]
                if isinstance(module, (nn.Linear, nn.Embedding)) and leaf == "weight":
                    s = resid_std if getattr(module, "residual_proj", False) else std
                    rules.setdefault(pname, ("normal", s))
                elif leaf == "bias":
                    rules.setdefault(pname, ("zeros", 0.0))
                else:  # norm gains
                    rules.setdefault(pname, ("ones", 0.0))
        # Keyed as named_parameters() names them: a tied matrix under its first name only.
        return {name: rules[name] for name, _ in self.named_parameters()}

    def initial_value(self, name: str, seed: int) -> torch.Tensor:
        """The initial value of parameter `name`: full shape, fp32, on the CPU, a pure function
        of (seed, name, config). A normal draw uses its own generator seeded by
        `param_seed(seed, name)`, so every rank of a sharded run can compute any parameter
        (and keep its shard) and get what a single process gets, at any world size."""
        table = self.__dict__.get("_init_table")
        if table is None:  # built once: names, rules and shapes do not change
            shapes = {n: p.shape for n, p in self.named_parameters()}
            table = {n: (*rule, shapes[n]) for n, rule in self.init_rules().items()}
            self.__dict__["_init_table"] = table
        kind, std, shape = table[name]
        if kind == "zeros":
            return torch.zeros(shape, device="cpu")
        if kind == "ones":
            return torch.ones(shape, device="cpu")
        g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
        return torch.empty(shape, device="cpu").normal_(0.0, std, generator=g)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Set every parameter to `initial_value(name, seed)` (None = a seed drawn from torch's
        global generator). Parameters on the meta device are skipped: a meta model is
        materialised with `to_empty(device=...)` and then initialised."""
        real = [(name, p) for name, p in self.named_parameters() if not p.is_meta]
        if not real:
            return  # a meta model: nothing to set, and torch's generator is left untouched
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        for name, p in real:
            p.copy_(self.initial_value(name, seed))

    def tie_weights(self) -> None:
        """Make lm_head.weight the token embedding's matrix again (when tied): moving a meta
        model to a real device gives each module its own new parameter."""
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.transformer.wte.weight:
            self.lm_head.weight = self.transformer.wte.weight

    def to_empty(self, *, device: Any, recurse: bool = True) -> GPT:
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    # -- bookkeeping ---------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied matrix counts once).

        exclude_embeddings=True counts only the transformer body (blocks and final norm): it
        leaves out the token embedding, the position embedding and the output projection,
        tied or not. This is the "non-embedding" N of Kaplan et al. 2020 and does not depend on
        the vocabulary."""
        if exclude_embeddings:
            body = [self.transformer.h, self.transformer.ln_f]
            return sum(p.numel() for m in body for p in m.parameters())
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to max_len positions (default block_size)."""
        max_len = self.cfg.block_size if max_len is None else max_len
        if not 0 < max_len <= self.cfg.block_size:
            raise ValueError(
                f"max_len must be in [1, block_size={self.cfg.block_size}], got {max_len}"
            )
        return KVCache(self.cfg.n_layer, max_len)

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: [B, T] token ids; targets: [B, T] next-token ids, -1 = ignore (no loss there).

        Without targets: (logits [B, T, V] float32 with padded ids at -inf, None).
        With targets: (None, mean cross-entropy over the non-ignored targets, a 0-dim float32
        tensor). The loss is computed from the final hidden states a chunk of positions at a
        time (`LMHead`), so training never holds the [B, T, V] logits; call without targets
        for them. With `kv_cache`, idx is the next chunk of a sequence whose first kv_cache.pos
        positions are already in the cache; positions are offset accordingly and the cache is
        advanced by T."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.cfg.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than block_size={self.cfg.block_size}: "
                "crop the input (or raise model.block_size)"
            )
        pos = torch.arange(start, start + T, device=idx.device)  # [T]

        x = self.transformer.wte(idx)  # [B, T, C]
        rope = None
        if self.cfg.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)  # [T, C] broadcast over B
        else:
            rope = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.transformer.drop(x)

        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            if ckpt and kv_cache is None:
                # Non-reentrant checkpointing: stores only the block input and re-runs the block
                # (with the same dropout RNG state) during backward.
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)  # [B, T, C]

        # Loss and logits in float32 even under autocast: log-softmax over ~50k classes in bf16
        # loses the small probabilities that the loss is made of. Padded ids are not tokens:
        # the loss leaves them out (a vocab_size-way softmax) and their logits are -inf, so
        # their probability is exactly 0 and sampling can never pick them.
        if targets is not None:
            return None, self.lm_head(x, targets)
        logits = self.lm_head(x).float()  # [B, T, V]
        if self.cfg.padded_vocab_size > self.cfg.vocab_size:
            # In-place is safe: the matmul's backward does not need its output.
            logits[..., self.cfg.vocab_size :] = float("-inf")
        return logits, None

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each row of idx ([B, T0]) by up to max_new_tokens sampled tokens.

        temperature 0 = greedy (argmax); otherwise logits/temperature, then optional top-k and
        top-p (nucleus) filtering (see `filter_logits`), then a multinomial draw with
        `generator`. Padded vocabulary ids are never produced.

        eos_id: a row that emits it is finished; its later positions are filled with eos_id, and
        generation stops early once every row is finished.

        Context length: without the cache, the model sees the last block_size tokens (older ones
        are cropped). With the cache (the default, O(T) per token instead of O(T^2)), the cache
        holds block_size positions: a prompt longer than that is cropped to its last block_size
        tokens, and generation STOPS when the cache is full, i.e. after at most
        block_size - min(T0, block_size) + 1 new tokens. Within that range the cached and
        uncached paths compute the same thing. Returns [B, T0 + n_new].

        Runs in eval mode (dropout off) and restores the previous mode afterwards."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be [B, T] with T >= 1, got shape {tuple(idx.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if eos_id is not None and not 0 <= eos_id < self.cfg.vocab_size:
            raise ValueError(
                f"eos_id={eos_id} is outside the vocabulary [0, {self.cfg.vocab_size})"
            )
        was_training = self.training
        self.eval()
        try:
            return self._generate(
                idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator
            )
        finally:
            self.train(was_training)

    def _generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        eos_id: int | None,
        use_cache: bool,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        V, block = self.cfg.vocab_size, self.cfg.block_size
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache = self.new_kv_cache() if use_cache else None
        logits = None
        if cache is not None and max_new_tokens > 0:
            # Prefill: run the (cropped) prompt once, filling the cache.
            logits, _ = self(idx[:, -block:], kv_cache=cache)
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = self(idx[:, -block:])  # crop the context to the last block_size
            assert logits is not None
            # Only real token ids: dropping the padded columns means they cannot be sampled.
            last = logits[:, -1, :V]  # [B, vocab_size]
            nxt = sample_next(last, temperature, top_k, top_p, generator)  # [B]
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            if eos_id is not None and bool(finished.all()):
                break
            if cache is not None:
                if cache.pos >= cache.max_len:
                    break  # the cache is full: no position left for the token just sampled
                logits, _ = self(nxt[:, None], kv_cache=cache)  # decode one token: [B, 1, V]
        return idx


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Keep the top-k and/or top-p (nucleus) candidates of each row; others become -inf.

    logits: [B, V]. top_k keeps the k largest logits (ties at the k-th value are all kept).
    top_p keeps the smallest set of most-likely tokens whose total probability is >= top_p
    (Holtzman et al. 2019): a token is dropped when the tokens ranked above it already reach
    top_p, so the most likely token is always kept. Applied in that order (top-k first)."""
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p  # rank 0 has mass_before 0 < top_p: always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits [B, V] -> [B] (int64). temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
