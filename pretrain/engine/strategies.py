"""Facts about the strategies, in one place: what each one is made of and how it is sized.

`pretrain.config.STRATEGIES` holds the names a user chooses from (the config schema validates
them); this module holds what those names mean to the engine and to the memory planner
(`pretrain.plan`): the ZeRO stage of each DeepSpeed strategy, the FSDP2 settings of each FSDP
strategy, the FSDP strategy each ZeRO one becomes without DeepSpeed, and DeepSpeed's bucket
size. Plain data and arithmetic, for the engine and the planner alike.
"""

from __future__ import annotations

# DeepSpeed strategy name -> ZeRO stage (zero3_offload is stage 3 with offload, engine/zero.py).
STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}

# strategy name -> how it shards (engine/fsdp.py's FSDPEngine arguments)
MODES: dict[str, dict[str, bool]] = {
    "fsdp": {"reshard_after_forward": True, "hybrid": False, "offload": False},
    "fsdp_grad_op": {"reshard_after_forward": False, "hybrid": False, "offload": False},
    "hsdp": {"reshard_after_forward": True, "hybrid": True, "offload": False},
    "fsdp_offload": {"reshard_after_forward": True, "hybrid": False, "offload": True},
}

# What a ZeRO strategy becomes without DeepSpeed: same memory model, FSDP2 mechanics.
FSDP_EQUIVALENT = {
    "zero1": ("fsdp_grad_op", "FSDP2 with reshard_after_forward=False"),
    "zero2": ("fsdp_grad_op", "FSDP2 with reshard_after_forward=False"),
    "zero3": ("fsdp", "FSDP2 full shard"),
    "zero3_offload": ("fsdp_offload", "FSDP2 full shard with CPUOffloadPolicy"),
}


def zero_bucket_elements(n_embd: int, configured: int = 0) -> int:
    """DeepSpeed's communication bucket in elements for a model of width `n_embd`:
    `configured` if set, else n_embd^2 (as Hugging Face's "auto" DeepSpeed config), at least
    2^20. DeepSpeed's own 5e7-5e8 element defaults are sized for models of billions of
    parameters: on a 150M one a 5e7-element fp32 bucket alone is a third of the model."""
    return int(configured) if configured > 0 else max(n_embd * n_embd, 2**20)
