"""The output projection and the training loss computed from it, a chunk of positions at a time.

The training loss (`GPT.forward(idx, targets)`) never materialises the [B, T, V] fp32 logits:
`LMHead` computes the cross-entropy and its gradient `LOSS_CHUNK_BYTES` of logits at a time
(`chunked_cross_entropy`). Its plain call `head(x)` returns the full logits, as an nn.Linear.

Shapes: N = positions (B * T, flattened), C = n_embd, V = vocabulary size (the real one:
padded rows of the weight take no part), V_padded = rows of the weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

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
