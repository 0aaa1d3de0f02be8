"""Everything `pretrain` reads or writes inside DeepSpeed's ZeRO optimizers, in one place.

DeepSpeed has no public API for a rank's own partition of the fp32 master weights and
optimizer state under stages 1 and 2 (its `safe_get_local_*` functions are ZeRO-3 only, and
move offloaded tensors to the device, which would make a copy we cannot load into). So this
adapter uses a few private attributes of `DeepSpeedZeroOptimizer` (stages 1, 2) and
`DeepSpeedZeroOptimizer_Stage3`, named in `REQUIRED`. `check()` runs when the engine is set up
and `tests/unit/test_deepspeed_state.py` runs it against the installed DeepSpeed for every
stage: an upgrade that renames or reshapes any of them fails there, loudly, by name, instead of
corrupting a checkpoint.

What a rank owns of a parameter is one contiguous range of the parameter's flattened
(row-major) elements, its `Fragment`:

    stages 1, 2   the flat fp32 partition of a param group covers a range of the concatenated
                  parameters; a parameter's fragment is its overlap with it (DeepSpeed's
                  `_hp_mapping`: `lp_fragment_address` in the parameter, `hp_fragment_address`
                  in the partition), possibly empty
    stage 3       each parameter is partitioned on its own: ceil(numel / world) elements per
                  rank, rank r holding [r * size, (r + 1) * size), the last ones padded
                  (`ds_tensor`, `grad_position` into the fp32 sub-group)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Attribute -> what it is, for the optimizer of each stage; `check` verifies them all.
REQUIRED: dict[str, dict[str, str]] = {
    "zero12": {
        "single_partition_of_fp32_groups": "list of this rank's flat fp32 master partitions",
        "bit16_groups": "list of lists of the 16-bit model parameters, per param group",
        "update_lp_params": "method: copy the fp32 masters into the 16-bit parameters",
        "loss_scaler": "the fp16 loss scaler (cur_scale)",
        "clip_grad": "gradient clipping norm used by step()",
        "optimizer": "the client (torch) optimizer stepping the fp32 partitions",
    },
    "zero3": {
        "fp32_partitioned_groups_flat": "list of this rank's flat fp32 master sub-groups",
        "fp16_groups": "list of lists of the model parameters, per sub-group",
        "sub_group_to_group_id": "sub-group index -> client param group index",
        "grad_position": "param id -> [sub-group, offset in it, partition numel]",
        "get_param_id": "method: the id grad_position is keyed by",
        "_reassign_or_swap_out_partitioned_parameters": "method: fp32 masters -> ds_tensor",
        "grad_partitions_flat_buffer": "this rank's gradient partition (model dtype), one flat buffer",
        "loss_scaler": "the fp16 loss scaler (cur_scale)",
        "clip_grad": "gradient clipping norm used by step()",
        "optimizer": "the client (torch) optimizer stepping the fp32 partitions",
    },
    "param12": {"_hp_mapping": "fragment of a parameter in this rank's fp32 partition or None"},
    "param3": {
        "ds_tensor": "this rank's partition of the 16-bit parameter",
        "ds_numel": "number of elements of the full parameter",
        "ds_shape": "shape of the full parameter",
    },
    "engine": {
        "global_steps": "optimizer steps taken (names the native checkpoint's tag)",
        "global_samples": "samples seen",
        "set_gradient_accumulation_boundary": "method: whether the next backward reduces",
    },
}


class DeepSpeedChanged(RuntimeError):
    """The installed DeepSpeed no longer has the internals this adapter relies on."""


@dataclass
class Fragment:
    """The elements [start, start + numel) of a parameter's flattened value that this rank owns,
    and its fp32 master copy of them (`master`, a 1-D view into DeepSpeed's flat partition:
    writing it writes the master)."""

    start: int
    numel: int
    master: torch.Tensor
    flat: torch.Tensor  # the flat fp32 partition `master` is a view of
    offset: int  # where `master` starts in `flat`


class DeepSpeedState:
    """The ZeRO optimizer of one `DeepSpeedEngine`, seen as per-parameter fragments."""

    def __init__(self, engine: Any, params: list[nn.Parameter]) -> None:
        self.engine = engine
        self.zero: Any = engine.optimizer
        self.stage = 3 if hasattr(self.zero, "fp32_partitioned_groups_flat") else 2
        self.params = params
        self.check()

    # -- the contract ----------------------------------------------------------------------
    def check(self) -> None:
        """Raise DeepSpeedChanged naming every missing internal."""
        import deepspeed

        kinds = [("engine", self.engine), ("zero3" if self.stage == 3 else "zero12", self.zero)]
        kinds += [("param3" if self.stage == 3 else "param12", p) for p in self.params[:1]]
        missing = [
            f"{type(obj).__name__}.{attr} ({what})"
            for kind, obj in kinds
            for attr, what in REQUIRED[kind].items()
            if not hasattr(obj, attr)
        ]
        if self.stage == 3:
            for p in self.params[:1]:
                where = self.zero.grad_position.get(self.zero.get_param_id(p))
                if not (isinstance(where, (list, tuple)) and len(where) == 3):
                    missing.append("grad_position[id] is no longer [sub-group, offset, numel]")
        if missing:
            raise DeepSpeedChanged(
                f"DeepSpeed {deepspeed.__version__} changed internals that pretrain's ZeRO "
                f"checkpointing relies on (pretrain/engine/deepspeed_state.py): "
                f"{'; '.join(missing)}. Pin the DeepSpeed version pretrain was tested with "
                "(pyproject.toml), or update the adapter."
            )

    # -- fragments -------------------------------------------------------------------------
    def fragment(self, p: Any) -> Fragment | None:
        """The part of `p` this rank owns, or None if it owns none of it."""
        zero = self.zero
        if self.stage == 3:
            group, offset, size = zero.grad_position[zero.get_param_id(p)]
            rank = torch.distributed.get_rank(group=p.ds_process_group)
            start = rank * size
            numel = max(0, min(size, p.ds_numel - start))  # the last partitions are padded
            if numel == 0:
                return None
            flat = zero.fp32_partitioned_groups_flat[group]
            return Fragment(start, numel, flat.narrow(0, offset, numel), flat, offset)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        return Fragment(lp.start, lp.numel, flat.narrow(0, hp.start, hp.numel), flat, hp.start)

    def flat_masters(self) -> list[tuple[int, torch.Tensor]]:
        """(client param-group index, flat fp32 master partition) pairs. ZeRO-3 hands its
        sub-groups to the torch optimizer only for the duration of each step, so the
        optimizer's own param_groups are empty between steps."""
        zero = self.zero
        if self.stage == 3:
            return [
                (zero.sub_group_to_group_id[i], flat)
                for i, flat in enumerate(zero.fp32_partitioned_groups_flat)
            ]
        return list(enumerate(zero.single_partition_of_fp32_groups))

    def flat_groups(self) -> list[tuple[int, torch.Tensor, list[nn.Parameter]]]:
        """(client param-group index, flat fp32 master partition, the parameters it holds
        fragments of), as `flat_masters` orders them. The same parameters in the same order on
        every rank (stages 1, 2: all of the group's; stage 3: its sub-group's), whatever each
        rank holds of them."""
        zero = self.zero
        if self.stage == 3:
            return [
                (zero.sub_group_to_group_id[i], flat, list(zero.fp16_groups[i]))
                for i, flat in enumerate(zero.fp32_partitioned_groups_flat)
            ]
        return [
            (i, flat, list(zero.bit16_groups[i]))
            for i, flat in enumerate(zero.single_partition_of_fp32_groups)
        ]

    def copy_master_to_model(self) -> None:
        """The fp32 masters were written: refresh the weights the model computes with (ZeRO-1/2:
        all-gather the 16-bit flat groups, a collective; ZeRO-3: each rank's own partitions)."""
        if self.stage == 3:
            for i in range(len(self.zero.fp16_groups)):
                self.zero._reassign_or_swap_out_partitioned_parameters(i)
        else:
            self.zero.update_lp_params()

    # -- memory --------------------------------------------------------------------------
    def release_gradient_pages(self) -> int:
        """ZeRO-3: give the pages of the gradient partition back to the OS (bytes released).

        DeepSpeed allocates it once, whole, and keeps it from one step to the next, through the
        forward pass: the gradient partition (in the model dtype, 2 bytes per parameter a rank
        owns under bf16) is then resident while the activations are too, which FSDP's gradients
        never are (created in backward, freed after the step). Between steps its content is
        dead: everything that reads it (norm, clipping, overflow check, the fp32 copy the
        optimizer steps) runs inside step(), and the next backward copies into it (on its first
        micro-batch, `partition_grads`) the part of every parameter that gets a gradient. A
        parameter that gets none then reads zeros (but on the two partial edge pages, which
        keep their values) where DeepSpeed would have read the previous step's gradient. So
        the pages can go, and come back as backward writes them, while the activations are
        freed. Plain host memory only (`release_pages`): on a GPU, or pinned, the buffer stays
        allocated."""
        if self.stage != 3:
            return 0
        from pretrain.engine.hostmem import release_pages

        return release_pages(self.zero.grad_partitions_flat_buffer)

    # -- scalars -----------------------------------------------------------------------------
    def set_clip(self, max_norm: float) -> None:
        self.zero.clip_grad = max_norm if max_norm > 0 else 0.0

    def loss_scale(self) -> tuple[float, int] | None:
        """(scale, clean steps since the last overflow) of the fp16 loss scaler, if dynamic."""
        scaler = getattr(self.zero, "loss_scaler", None)
        if scaler is None or not hasattr(scaler, "cur_scale"):
            return None
        tracker = getattr(scaler, "cur_iter", 0) - getattr(scaler, "last_overflow_iter", -1)
        return float(scaler.cur_scale), max(0, tracker - 1)

    def set_loss_scale(self, scale: float) -> None:
        scaler = getattr(self.zero, "loss_scaler", None)
        if scaler is not None and hasattr(scaler, "cur_scale"):
            scaler.cur_scale = scale

    def set_progress(self, steps: int, samples: int) -> None:
        self.engine.global_steps = steps
        self.engine.global_samples = samples

    # -- memory accounting -------------------------------------------------------------------
    def param_tensors(self) -> list[torch.Tensor]:
        """The storages holding this rank's 16-bit parameters (ZeRO-3: its partitions)."""
        out: list[torch.Tensor] = [p.data for p in self.params]
        return out + [p.ds_tensor for p in self.params if hasattr(p, "ds_tensor")]

    def grad_tensors(self) -> list[torch.Tensor | None]:
        """The storages holding gradients: .grad, and DeepSpeed's partition buffers."""
        zero = self.zero
        grads: list[torch.Tensor | None] = [p.grad for p in self.params]
        for bucket in getattr(zero, "averaged_gradients", {}).values():
            grads += [t for t in (bucket or []) if torch.is_tensor(t)]
        for attr in ("grad_partitions_flat_buffer", "grads_in_partition"):
            t = getattr(zero, attr, None)
            if torch.is_tensor(t):
                grads.append(t)
        return grads
