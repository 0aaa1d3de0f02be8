"""Peak memory and time of the training loss: full [B, T, V] logits against the chunked loss.

    python -m benchmarks.bench_loss                 # vocab 50304, seq 1024, width 768
    python -m benchmarks.bench_loss --batches 1     # quicker

The loss of GPT-2 small's output layer on random hidden states [B, 1024, 768] and a tied
[50304, 768] weight, forward and backward, two ways:

    full      what `GPT.forward` computed before: logits = lm_head(x).float(), padded ids at
              -inf, F.cross_entropy over [B * T, V] (the logits, log-softmax and both their
              gradients exist at once)
    chunked   `pretrain.model.chunked_cross_entropy`, as `GPT.forward(idx, targets)` runs it

Memory is the rise of the process's peak RSS during forward + backward (the kernel's
high-water mark, reset first; glibc made to return every freed block of 64 KiB or more at once,
so RSS is live memory), less the two gradients both ways leave behind (of the hidden states and
of the weight): what the loss holds on top of them. The inputs exist before and are not
counted.
Also printed: the loss and the largest relative difference of the two gradients (fp32 noise
expected in fp32, bf16 rounding under autocast). Time is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pretrain.model import LOSS_CHUNK_BYTES, chunked_cross_entropy

VOCAB, PADDED, WIDTH, SEQ = 50257, 50304, 768, 1024


def full_loss(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logits = (x @ w.T).float()
    logits[..., VOCAB:] = float("-inf")
    return F.cross_entropy(logits.view(-1, PADDED), t.view(-1), ignore_index=-1)


def chunked_loss(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    rows = max(1, LOSS_CHUNK_BYTES // (4 * VOCAB))
    return chunked_cross_entropy(x.view(-1, WIDTH), w, t.view(-1), VOCAB, rows)


def run(kind: str, batch: int, autocast: bool, repeats: int) -> dict[str, object]:
    from benchmarks.bench_memory import PeakMeter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, SEQ, WIDTH, generator=g).requires_grad_()
    w = (torch.randn(PADDED, WIDTH, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    fn = full_loss if kind == "full" else chunked_loss
    ctx = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if autocast
        else contextlib.nullcontext
    )
    meter = PeakMeter()
    times, peak = [], 0
    for _ in range(1 + repeats):
        x.grad = w.grad = None
        before = meter.rss()
        meter.reset()
        t0 = time.perf_counter()
        with ctx():
            loss = fn(x, w, t)
        loss.backward()
        times.append(time.perf_counter() - t0)
        assert x.grad is not None and w.grad is not None
        # What the loss needs beyond the gradients it leaves behind (which any loss leaves).
        left = x.grad.untyped_storage().nbytes() + w.grad.untyped_storage().nbytes()
        peak = max(peak, meter.peak() - before - left)
    grads = (x.grad.detach().clone(), w.grad.detach().clone())
    return {"peak": peak, "loss": float(loss.detach()), "grads": grads,
            "s": statistics.median(times[1:] or times)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", default="1,8", help="micro-batch sizes (sequences of 1024)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # Freed blocks go back to the OS at once, so the RSS high-water mark is live memory.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.bench_loss", *sys.argv[1:]])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    lines = [
        "| precision | batch x seq | full: peak MiB | chunked: peak MiB | full / chunked "
        "| full s | chunked s | loss full / chunked | max rel. grad diff |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for autocast in (False, True):
        for batch in (int(b) for b in args.batches.split(",")):
            full = run("full", batch, autocast, args.repeats)
            ours = run("chunked", batch, autocast, args.repeats)
            diff = max(
                float((a - b).abs().max() / b.abs().max())
                for a, b in zip(ours["grads"], full["grads"])  # type: ignore[arg-type]
            )
            lines.append(
                f"| {'bf16 autocast' if autocast else 'fp32'} | {batch} x {SEQ} "
                f"| {full['peak'] / 2**20:,.0f} | {ours['peak'] / 2**20:,.0f} "  # type: ignore[operator]
                f"| {full['peak'] / ours['peak']:.1f}x "  # type: ignore[operator]
                f"| {full['s']:.2f} | {ours['s']:.2f} "
                f"| {full['loss']:.5f} / {ours['loss']:.5f} | {diff:.1e} |"
            )
    print(
        f"Output layer of GPT-2 small: hidden [B, {SEQ}, {WIDTH}], weight [{PADDED}, {WIDTH}] "
        f"(vocab {VOCAB}); {platform.machine()}, {torch.get_num_threads()} threads, load "
        f"average {os.getloadavg()[0]:.1f}. Peak = rise of peak RSS in forward + backward, less "
        "the gradients of x and of the weight left behind.\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
