"""Which strategy to pick: the cheapest in communication whose every phase fits the device, or,
when none does, by how much and what would make one fit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pretrain.model import GPTConfig
from pretrain.plan.costs import GB, MemoryEstimate, estimate

# Cheapest communication first: replicated (one all-reduce of gradients) < ZeRO-1 (reduce-
# scatter + all-gather, same volume) < ZeRO-2 < FSDP SHARD_GRAD_OP (one parameter all-gather
# per step) < HSDP (re-gathers parameters, but only inside a node) < ZeRO-3 / FSDP (parameters
# all-gathered in forward and again in backward: 1.5x the volume; fsdp first, it is native
# PyTorch) < ZeRO-3 with CPU offload (also PCIe traffic and a CPU optimizer step).
COMM_ORDER = (
    "single",
    "ddp",
    "zero1",
    "zero2",
    "fsdp_grad_op",
    "hsdp",
    "fsdp",
    "zero3",
    "zero3_offload",
)


def candidates(world_size: int, nodes: int = 1) -> list[str]:
    """Strategies worth recommending for this layout, cheapest communication first: single for
    one rank, ddp for several; hsdp only across several nodes (with one it is fsdp)."""
    out = []
    for s in COMM_ORDER:
        if s == "single" and world_size > 1:
            continue
        if s == "ddp" and world_size == 1:
            continue
        if s == "hsdp" and nodes == 1:
            continue
        out.append(s)
    return out


@dataclass
class Recommendation:
    strategy: str | None
    """The cheapest strategy that fits, or None."""
    message: str
    """One paragraph for a human: the choice and why, or why nothing fits and what to change."""


def recommend(
    model_cfg: GPTConfig,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    precision: str,
    activation_checkpointing: bool,
    device_memory_gb: float,
    nodes: int = 1,
    *,
    usable_fraction: float = 0.9,
    host_memory_gb: float = 0.0,
    **kw: Any,
) -> Recommendation:
    """The first strategy in COMM_ORDER whose estimate fits `usable_fraction` of the device
    (and, when host_memory_gb > 0, whose CPU part fits the host's share per rank)."""
    if device_memory_gb <= 0 or not 0 < usable_fraction <= 1:
        raise ValueError(
            f"device_memory_gb must be > 0 and usable_fraction in (0, 1], got "
            f"{device_memory_gb} and {usable_fraction}"
        )
    budget = device_memory_gb * GB * usable_fraction
    ranks_per_node = world_size // nodes
    host_budget = host_memory_gb * GB / ranks_per_node if host_memory_gb > 0 else math.inf

    def fits(e: MemoryEstimate) -> bool:
        return e.peak <= budget and e.host_peak <= host_budget

    def est(s: str, ac: bool, mb: int = micro_batch, ws: int = world_size) -> MemoryEstimate:
        return estimate(model_cfg, s, ws, mb, seq_len, precision, ac, nodes, **kw)

    names = candidates(world_size, nodes)
    for s in names:
        e = est(s, activation_checkpointing)
        if fits(e):
            why = (
                f"{s}: the cheapest in communication that fits ({e.peak / GB:.2f} GB of "
                f"{budget / GB:.2f} GB usable = {usable_fraction:.0%} of {device_memory_gb:g} GB"
            )
            cheaper = names[: names.index(s)]
            if cheaper:
                needs = ", ".join(
                    f"{c} {est(c, activation_checkpointing).peak / GB:.2f}" for c in cheaper
                )
                why += f"; cheaper ones need {needs} GB"
            return Recommendation(s, why + ").")

    # Nothing fits: say by how much, and what would make it fit.
    best = min(names, key=lambda s: est(s, activation_checkpointing).peak)
    e = est(best, activation_checkpointing)
    lines = [
        f"nothing fits: the smallest is {best} at {e.peak / GB:.2f} GB per rank "
        f"(activations {e.activations / GB:.2f} GB) > {budget / GB:.2f} GB usable."
    ]
    if not activation_checkpointing:
        for s in names:
            if fits(est(s, True)):
                lines.append(
                    f"Set activation_checkpointing=true: {s} then needs "
                    f"{est(s, True).peak / GB:.2f} GB."
                )
                break
    for ac in (activation_checkpointing, True):
        mb = next((m for m in range(micro_batch - 1, 0, -1) if fits(est(best, ac, mb=m))), 0)
        if mb:
            with_ac = (
                " with activation checkpointing" if ac and not activation_checkpointing else ""
            )
            lines.append(
                f"Lower micro_batch to {mb}{with_ac} ({best}; keep the global batch with "
                "gradient accumulation)."
            )
            break
    if e.activations > budget:
        lines.append("Activations alone exceed the usable memory: more ranks cannot help.")
    sharded = "zero3_offload" if best == "zero3_offload" else "fsdp"
    for ws in (2**k for k in range(1, 13)):
        if (
            ws > world_size
            and ws % nodes == 0
            and fits(est(sharded, activation_checkpointing, ws=ws))
        ):
            lines.append(f"Or shard over more ranks: {sharded} fits at world_size={ws}.")
            break
    if host_budget < math.inf and e.host_peak > host_budget:
        lines.append(
            f"{best}'s host part ({e.host_peak / GB:.2f} GB per rank) exceeds the host's "
            f"{host_budget / GB:.2f} GB per rank."
        )
    return Recommendation(None, " ".join(lines))
