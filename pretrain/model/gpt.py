"""The GPT network: norms, rotary position embeddings, attention, MLP, `Block` and `GPT`.

By default this is GPT-2 (Radford et al. 2019) as in nanoGPT: learned absolute positions,
pre-LayerNorm blocks with biases, a tanh-approximated GELU MLP of width 4*d and an output
projection tied to the token embedding. Configuration switches (`GPTConfig`, read here and
nowhere else) turn on the Llama-style options: rotary position embeddings (RoPE), RMSNorm, a
SwiGLU MLP, no biases, grouped-query attention (GQA, fewer key/value heads than query heads)
and an untied output projection; and the options the open model families add on top of Llama:
biases on q/k/v alone (Qwen2), an RMSNorm of each head's q and k (Qwen3), a head size apart
from n_embd / n_head (Qwen3), the llama3 RoPE frequency rule (Llama 3.1+). A family is a set of
values of these switches (`pretrain.hf` maps each to its transformers class), not a copy of
the network.

Shapes in comments: B = batch, T = sequence length (this chunk), S = key length (T, or the
cache fill plus T when decoding), C = n_embd, H = n_head, Hkv = n_kv_head (of the block: a
pruned model may have other counts per layer), D = head_dim = C/H (or model.head_size),
V = padded vocabulary size.

Layout of the parameters (stable names, used by checkpoint export and by the parallelism layer,
which wraps `transformer.h[i]` blocks without the model knowing):

    transformer.wte            token embedding             [V, C]
    transformer.wpe            position embedding          [block_size, C]   (learned only)
    transformer.h.{i}.ln_1     norm before attention
    transformer.h.{i}.attn.c_attn   fused q|k|v projection [(H + 2*Hkv) * D, C] (bias with
                                                            bias or qkv_bias)
    transformer.h.{i}.attn.q_norm, k_norm  q/k norm gains  [D]  (qk_norm only)
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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.model import generate as generation
from pretrain.model import init as param_init
from pretrain.model.config import GPTConfig
from pretrain.model.generate import KVCache
from pretrain.model.init import mark_residual_proj
from pretrain.model.loss import LMHead

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
    """The norm `cfg.norm` names, over the residual width C (LayerNorm has a bias iff cfg.bias)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: GPTConfig, device: torch.device | None = None) -> torch.Tensor:
    """The rotation frequency of each channel pair i < D/2, [D/2] float32: rope_theta ** (-2i/D),
    then the model's `rope_scaling` rule.

    RoPE's frequencies come from here alone, so that another frequency rule is a change to
    this function, not to the tables or the attention. llama3 (Llama 3.1+) makes the long
    wavelengths, which never turned a full circle within the original context
    (rope_original_max_len), rope_factor times longer, keeps the short ones and blends in
    between. It runs the same float32 steps as transformers' llama3 rule, so the frequencies
    are theirs bit for bit."""
    D = cfg.head_dim
    exponent = torch.arange(0, D, 2, device=device, dtype=torch.float32) / D
    inv_freq = 1.0 / (cfg.rope_theta**exponent)
    if cfg.rope_scaling != "llama3":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at old_len/low, 1 at old_len/high
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(between, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings at the given integer positions.

    positions: [T] -> cos, sin: [T, D] in float32 (each frequency repeated for both halves,
    matching `apply_rope`'s rotate-half layout).

    Computed on the fly each forward instead of stored as buffers: the cost is a [T, D/2] outer
    product (negligible next to the matmuls), and it avoids two classic bugs with buffers:
    `model.to(bfloat16)` (DeepSpeed/FSDP casting the module) would round the angles of late
    positions to bf16, and a model built on the meta device would need them recomputed."""
    inv_freq = rope_frequencies(cfg, positions.device)  # [D/2]
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


class CausalSelfAttention(nn.Module):
    """Causal self-attention of block `layer_idx`: its head counts and sizes, biases and dropout
    all come from `cfg`, read here once; RoPE tables arrive ready from `GPT.forward`."""

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
        self.c_attn = nn.Linear(cfg.n_embd, qkv_dim, bias=cfg.bias or cfg.qkv_bias)
        # Writes into the residual stream: scaled init (see `init_rules`).
        self.c_proj = mark_residual_proj(
            nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        )
        # q/k norm (Qwen3): each head's query and key RMS-normalised over its D channels, with
        # one [D] gain for all query heads and one for all key heads.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
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
        q, k = q.view(B, T, H, D), k.view(B, T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over each head's D channels, before RoPE
        q = q.transpose(1, 2)  # [B, H, T, D]
        k = k.transpose(1, 2)  # [B, Hkv, T, D]
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
    """The feed-forward branch of block `layer_idx`: GELU (GPT-2) or SwiGLU (Llama), per `cfg`."""

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden_of(layer_idx)
        # SwiGLU needs two input projections (gate and up); they are fused into one matmul with
        # output rows laid out [gate: hidden | up: hidden].
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = mark_residual_proj(nn.Linear(hidden, cfg.n_embd, bias=cfg.bias))
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

    # -- initialisation (the rules and values are in pretrain.model.init) ---------------------

    def init_rules(self) -> dict[str, tuple[str, float]]:
        """How each parameter (by name, a tied matrix once) starts: ("normal", std), ("zeros",
        0) or ("ones", 0); see `pretrain.model.init.init_rules`."""
        return param_init.init_rules(self, self.cfg)

    def initial_value(self, name: str, seed: int) -> torch.Tensor:
        """The initial value of parameter `name` (full shape, fp32, CPU), a pure function of
        (seed, name, config), computable by any rank; see `pretrain.model.init.initial_value`."""
        return param_init.initial_value(self, self.cfg, name, seed)

    def init_weights(self, seed: int | None = None) -> None:
        """Set every parameter to `initial_value(name, seed)` (None = a seed drawn from torch's
        global generator); parameters on the meta device are skipped."""
        param_init.init_weights(self, self.cfg, seed)

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
        return generation.new_kv_cache(self.cfg, max_len)

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
            window = self.cfg.sliding_window == self.cfg.block_size
            raise ValueError(
                f"sequence of {start + T} tokens is longer than block_size={self.cfg.block_size}"
                + (
                    " = model.sliding_window (beyond it the source model's attention window "
                    "would apply, which this model does not compute): crop the input"
                    if window
                    else ": crop the input (or raise model.block_size)"
                )
            )
        pos = torch.arange(start, start + T, device=idx.device)  # [T]

        x = self.transformer.wte(idx)  # [B, T, C]
        rope = None
        if self.cfg.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)  # [T, C] broadcast over B
        else:
            rope = rope_cos_sin(pos, self.cfg)
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

    # `model.generate(idx, max_new_tokens, ...)`: the sampling loop lives with the KV cache and
    # the samplers; bound here as a method, so its signature and docstring are written once.
    generate = generation.generate
