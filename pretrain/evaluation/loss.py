"""The one evaluation routine: a model's loss over batches of (x, y), y = -1 ignored.

Whoever runs the model decides how a forward is done: in-loop validation goes through the
training engine (sharded or not, in the run's precision: `Engine.eval_loss`); `pretrain.eval`
through a plain model under autocast (`model_loss`). Either gives one callable, x and y
[B, T] -> the batch's mean loss over its targets y != -1 (`LossFn`), and `batch_losses` runs it
over the batches. Two summaries of those batch losses:

    mean_loss   the mean of the batches' mean losses: in-loop validation, whose batches are
                training windows of one size (each batch weighs the same, as the training loss)
    total_nll   the summed NLL and the number of targets: `pretrain.eval`, whose padded windows
                hold different numbers of targets (the loss per predicted token)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.engine.precision import autocast
from pretrain.quantize import model_is_quantized

# (x, y) -> the mean loss over the targets y != -1: x, y [B, T] int64 on the model's device.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def batch_losses(
    loss_fn: LossFn, batches: Batches, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(mean loss, number of targets) of each batch, as 0-dim tensors on `device` (no host
    sync per batch)."""
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield loss_fn(x, y).float(), (y != -1).sum()


def mean_loss(loss_fn: LossFn, batches: Batches, device: torch.device) -> torch.Tensor:
    """The mean of the batches' mean losses (fp32, 0-dim; 0 without batches)."""
    total, n = torch.zeros((), device=device), 0
    for loss, _ in batch_losses(loss_fn, batches, device):
        total += loss
        n += 1
    return total / max(n, 1)


def total_nll(
    loss_fn: LossFn, batches: Batches, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL in nats, number of targets scored) over `batches`, both 0-dim float64. A
    batch whose targets are all ignored (a mean of 0/0) adds nothing."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for loss, n in batch_losses(loss_fn, batches, device):
        n = n.double()
        total += torch.where(n > 0, loss.double() * n, torch.zeros_like(n))
        count += n
    return total, count


def model_loss(model: nn.Module, device: torch.device, precision: str) -> LossFn:
    """The `LossFn` of a plain (unwrapped) model: eval mode, no gradients, under the autocast of
    `precision` (fp32, bf16 or fp16). The model's own chunked loss, which never holds the
    [B, T, V] logits (10 GB of fp32 for 16k tokens of a 152k vocabulary); a quantized model's
    output layer (torchao int8) computes its projection but not the chunked loss, which needs
    the weight's transpose, so there it is the cross-entropy of the logits."""
    quantized = model_is_quantized(model)

    @torch.no_grad()
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with autocast(device, precision):
                if not quantized:
                    return model(x, y)[1].detach().float()
                logits, _ = model(x)  # [B, T, V] fp32, padded vocabulary ids at -inf
        finally:
            model.train(was_training)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1)

    return loss
