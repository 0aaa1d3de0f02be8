"""Generation: the KV cache for incremental decoding, top-k/top-p sampling, and `generate`,
the loop that `GPT.generate` runs (the function is bound to the class as that method).

Shapes: B = batch, T = tokens of this chunk (T0 = of the prompt), Hkv = key/value heads,
D = head size, V = vocabulary size.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pretrain.model.config import GPTConfig


class Decoder(Protocol):
    """What generation needs of the network (`GPT` is one): no import of it, which imports
    this module."""

    cfg: GPTConfig
    training: bool

    def __call__(self, idx: torch.Tensor, *, kv_cache: Any = None) -> tuple[torch.Tensor, Any]: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


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


def new_kv_cache(cfg: GPTConfig, max_len: int | None = None) -> KVCache:
    """An empty KV cache for a model of `cfg`, up to max_len positions (default block_size)."""
    max_len = cfg.block_size if max_len is None else max_len
    if not 0 < max_len <= cfg.block_size:
        raise ValueError(f"max_len must be in [1, block_size={cfg.block_size}], got {max_len}")
    return KVCache(cfg.n_layer, max_len)


@torch.no_grad()
def generate(
    model: Decoder,
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
    holds up to block_size positions (no more than the prompt and the new tokens need, so a
    model with a 128k-position block_size allocates only what it uses): a prompt longer than
    that is cropped to its last block_size tokens, and generation STOPS when the cache is
    full, i.e. after at most block_size - min(T0, block_size) + 1 new tokens. Within that
    range the cached and uncached paths compute the same thing. Returns [B, T0 + n_new].

    Runs in eval mode (dropout off) and restores the previous mode afterwards."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be [B, T] with T >= 1, got shape {tuple(idx.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if eos_id is not None and not 0 <= eos_id < model.cfg.vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {model.cfg.vocab_size})")
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator
        )
    finally:
        model.train(was_training)


def _generate(
    model: Decoder,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The sampling loop of `generate`, whose arguments it takes already checked."""
    V, block = model.cfg.vocab_size, model.cfg.block_size
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    prompt = idx[:, -block:]
    # The prompt and every new token but the last (which is sampled, never fed back).
    needed = min(block, prompt.size(1) + max(0, max_new_tokens - 1))
    cache = new_kv_cache(model.cfg, needed) if use_cache else None
    logits = None
    if cache is not None and max_new_tokens > 0:
        # Prefill: run the (cropped) prompt once, filling the cache.
        logits, _ = model(prompt, kv_cache=cache)
    for _ in range(max_new_tokens):
        if cache is None:
            logits, _ = model(idx[:, -block:])  # crop the context to the last block_size
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
            logits, _ = model(nxt[:, None], kv_cache=cache)  # decode one token: [B, 1, V]
    return idx


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
