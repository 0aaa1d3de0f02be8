"""The one evaluation routine: the summed negative log-likelihood of batches of (x, y).

Whoever runs the model decides how a forward is done: in-loop validation goes through the
training engine (sharded or not, in the run's precision: `Engine.eval_loss`); `pretrain.eval`
through a plain model under autocast (`model_loss`). Either gives one callable, x and y
[B, T] -> the batch's mean loss over its targets y != -1, and `total_nll` sums it over batches,
weighting each batch by its targets, so that the result is the loss per predicted token
whatever the batching and however many targets a batch ignores (fine-tuning data masks its
prompts, `pretrain.eval` pads its windows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.engine.precision import autocast

# (x, y) -> the mean loss over the targets y != -1: x, y [B, T] int64 on the model's device.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def total_nll(
    loss_fn: LossFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL in nats, number of targets scored) over `batches`, both 0-dim float64 tensors
    on `device` (no host sync per batch). A batch without targets is skipped."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n = (y != -1).sum().double()  # the targets the mean was taken over
        loss = loss_fn(x, y).double()
        # A batch whose targets are all ignored has a mean of 0/0: it adds nothing.
        total += torch.where(n > 0, loss * n, torch.zeros_like(loss))
        count += n
    return total, count


def model_loss(model: nn.Module, device: torch.device, precision: str) -> LossFn:
    """The `LossFn` of a plain (unwrapped) model: eval mode, no gradients, under the autocast of
    `precision` (fp32, bf16 or fp16). It takes the cross-entropy of the model's logits
    ([B, T, V], fp32) rather than the model's chunked training loss: a quantized model's output
    layer (torchao int8) computes its projection but not the chunked loss, which needs the
    weight's transpose. Callers size their batches (`pretrain.eval`'s `batch_tokens`)."""

    @torch.no_grad()
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with autocast(device, precision):
                logits, _ = model(x)  # [B, T, V] fp32, padded vocabulary ids at -inf
        finally:
            model.train(was_training)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1)

    return loss
