"""Memory planner: per-rank memory of every parallelism strategy, and which one to pick.

    python -m pretrain.plan model=gpt2-1.5b world_size=8 micro_batch=4 precision=bf16 \
        device_memory_gb=40

prints, per rank, the bytes of parameters, gradients, optimizer state, transient buffers and
activations (with and without activation checkpointing) for each strategy, the peak of each
phase of a run (init, train, save, resume, on the device and in host memory), and recommends
the cheapest one, in communication, whose every phase fits the device.

    sizes.py      parameter counts of the real model, built on the meta device
    costs.py      the cost model: model states, activations, buffers, the peak of each phase
                  (its docstring derives every formula)
    recommend.py  the cheapest strategy, in communication, that fits
    cli.py        the command line above (Hydra), run by `__main__.py`

The Python API: `estimate(model_cfg, strategy, world_size, ...)` (a `MemoryEstimate` per rank)
and `recommend(...)`, importable from here.
"""

from pretrain.plan.costs import MemoryEstimate, estimate
from pretrain.plan.recommend import Recommendation, recommend

__all__ = ["MemoryEstimate", "Recommendation", "estimate", "recommend"]
