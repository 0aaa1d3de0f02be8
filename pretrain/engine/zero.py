"""zero1, zero2, zero3, zero3_offload: DeepSpeed ZeRO through Accelerate's DeepSpeed plugin.

The DeepSpeed config is generated from the Hydra config (`deepspeed_config`); a user's own
DeepSpeed JSON (`strategy.deepspeed_config=<path>`) is merged on top of it. The optimizer is
our torch AdamW (no DeepSpeed-named optimizer: that would JIT-compile fused Adam), which
DeepSpeed re-points at its flat fp32 partitions:

    zero1          optimizer state (and fp32 master weights) partitioned across ranks
    zero2          + gradients reduce-scattered into partitions
    zero3          + parameters partitioned; gathered per module for forward and backward
    zero3_offload  zero3 with parameters and optimizer (state + step) in host memory

Gradient accumulation: the loop calls `micro_step` accum times, then `optimizer_step` once.
DeepSpeed's engine divides each loss by its `gradient_accumulation_steps` (= accum) in
`backward`, and reduces/steps only at a boundary; we set the boundary explicitly on every
micro-batch (`last`), so DeepSpeed's own micro-step counter never decides anything.

Portable state: `state_dict` assembles full fp32 weights and AdamW moments per parameter name
from DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`: collectives, every rank calls them), in exactly the layout
`get_model_state_dict`/`get_optimizer_state_dict` give for the plain model, so a ZeRO
checkpoint loads under FSDP, DDP or one process, and vice versa. `save_native` also writes
DeepSpeed's own checkpoint (with its `zero_to_fp32.py`).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import Config, ConfigError
from pretrain.engine.base import Engine, OptimizerFactory, scaler_state, storage_bytes

# DeepSpeed 0.19 calls torch collectives that torch 2.13 has deprecated, once per bucket per step.
warnings.filterwarnings(
    "ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning
)

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}

# DeepSpeed keys the training loop owns: a user JSON may not change them.
LOOP_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (override wins; "auto" keeps base's value)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif value == "auto" and key in out:
            continue
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_user_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"strategy.deepspeed_config={path}: no such file. Point it at a DeepSpeed JSON "
            "(its keys override the generated config), or leave it empty"
        )
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"strategy.deepspeed_config={path} is not valid JSON: {e}") from e
    if not isinstance(user, dict):
        raise ConfigError(f"strategy.deepspeed_config={path} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(
                f"strategy.deepspeed_config={path} defines '{key}', but the optimizer and the "
                "learning-rate schedule come from optim.* and schedule.*: remove that section"
            )
    return user


def deepspeed_config(cfg: Config, world_size: int, accum: int) -> dict[str, Any]:
    """The DeepSpeed config for strategy `cfg.strategy.name`, with the user's JSON on top."""
    name = cfg.strategy.name
    stage = STAGES[name]
    bucket = int(cfg.strategy.reduce_bucket_size)
    zero: dict[str, Any] = {
        "stage": stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "contiguous_gradients": True,
        "overlap_comm": False,
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=bucket,
            # Partition every parameter, small ones too (DeepSpeed's default keeps tensors
            # under 1e5 elements whole on every rank): memory 1/N as with FSDP.
            stage3_param_persistence_threshold=0,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if name == "zero3_offload":
        pin = torch.cuda.is_available()
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.train.micro_batch * accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        # Our torch AdamW, not a DeepSpeed-named optimizer (no fused-Adam compile); with
        # offload it steps the host-side partitions.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    dtype = cfg.precision.dtype
    ds["bf16"] = {"enabled": dtype == "bf16"}
    if dtype == "bf16":
        # DeepSpeed would reduce gradients in the model dtype; DDP and FSDP reduce in fp32,
        # and so must we, or ZeRO would silently differ from them.
        ds["communication_data_type"] = "fp32"
    ds["fp16"] = {"enabled": False}
    if dtype == "fp16":
        # Dynamic loss scaling with the same policy as torch's GradScaler: start at 2^16, halve
        # on overflow (skipping the step), double after 2000 clean steps.
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 2000,
            "hysteresis": 1,
            "min_loss_scale": 1,
        }
    if cfg.strategy.deepspeed_config:
        user = read_user_config(cfg.strategy.deepspeed_config)
        ds = merge(ds, user)
    return ds


def check_geometry(ds: dict[str, Any], cfg: Config, world_size: int, accum: int) -> None:
    want = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.train.micro_batch * accum * world_size,
    }
    for key, value in want.items():
        if int(ds.get(key, value)) != value:
            raise ConfigError(
                f"strategy.deepspeed_config sets {key}={ds[key]}, but the run's batch geometry "
                f"gives {value} (train.micro_batch, train.global_batch_tokens, world size): "
                "remove it from the DeepSpeed JSON and set the batch through train.*"
            )


def unavailable_reason(cfg: Config, device_type: str) -> str | None:
    """Why DeepSpeed cannot run this config here, or None if it can (imports deepspeed)."""
    try:
        import deepspeed  # noqa: F401
        from deepspeed.accelerator import get_accelerator
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return f"deepspeed failed to import ({type(e).__name__}: {e})"
    if cfg.precision.dtype == "fp16" and not get_accelerator().is_fp16_supported():
        return f"DeepSpeed does not support fp16 on this device ({device_type})"
    if cfg.precision.dtype == "bf16" and not get_accelerator().is_bf16_supported():
        return f"DeepSpeed does not support bf16 on this device ({device_type})"
    return None


class ZeroEngine(Engine):
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.raw_model = model
        self.stage = STAGES[self.name]
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        user = (
            read_user_config(self.cfg.strategy.deepspeed_config)
            if self.cfg.strategy.deepspeed_config
            else {}
        )
        owned = {k: v for k, v in user.items() if k in LOOP_OWNED}
        check_geometry(merge(ds, owned), self.cfg, self.world_size, self.accum)
        self.accelerator.gradient_accumulation_steps = self.accum

        # Names of the parameters, taken before DeepSpeed re-points the optimizer at its flat
        # partitions: the first name of a tied parameter, as torch's state-dict API uses.
        self.param_names: dict[int, str] = {}
        for fqn, p in model.named_parameters():
            self.param_names.setdefault(id(p), fqn)
        client = make_optimizer(model)
        self.group_meta = [
            (
                {k: copy.deepcopy(v) for k, v in g.items() if k != "params"},
                [self.param_names[id(p)] for p in g["params"]],
            )
            for g in client.param_groups
        ]
        self.params = [p for p in model.parameters() if p.requires_grad]

        self.ds: Any = self.accelerator.prepare(model, client)[0]  # the DeepSpeedEngine
        self.model = self.ds
        self.zero: Any = self.ds.optimizer  # DeepSpeedZeroOptimizer(_Stage3)
        self.optimizer = self.zero.optimizer  # our torch AdamW, now over flat fp32 partitions

    # -- training ---------------------------------------------------------------------------
    def micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        # The boundary decides whether this backward reduces (zero1) / finishes the
        # reduce-scatter (zero2/3) and whether step() applies the update.
        self.ds.set_gradient_accumulation_boundary(last)
        _, loss = self.model(x, y)
        self.ds.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps
        return loss.detach().float()

    def optimizer_step(self, lr: float, max_norm: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if hasattr(self.zero, "clip_grad"):
            self.zero.clip_grad = max_norm if max_norm > 0 else 0.0
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"))
        return torch.as_tensor(norm, dtype=torch.float32).detach().cpu()

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # DeepSpeed runs the model in its configured dtype itself: no autocast on top.
        self.ds.eval()
        _, loss = self.ds(x, y)
        self.ds.train()
        return loss.detach().float()

    # -- portable state ----------------------------------------------------------------------
    def _flat_masters(self) -> list[tuple[int, torch.Tensor]]:
        """(optimizer param-group index, flat fp32 master partition) pairs. ZeRO-3 hands its
        sub-groups to the torch optimizer only for the duration of each step, so the optimizer's
        own param_groups are empty between steps."""
        zero = self.zero
        if self.stage == 3:
            return [
                (zero.sub_group_to_group_id[i], flat)
                for i, flat in enumerate(zero.fp32_partitioned_groups_flat)
            ]
        return list(enumerate(zero.single_partition_of_fp32_groups))

    def _init_optimizer_state(self) -> None:
        """Create AdamW's state on the flat partitions if no step was taken yet (as torch's
        state-dict API does: one step with zero gradients and lr 0, which moves nothing)."""
        opt = self.optimizer
        flats = self._flat_masters()
        if all(opt.state.get(flat) for _, flat in flats):
            return
        saved_params = [g["params"] for g in opt.param_groups]
        saved_lrs = [g["lr"] for g in opt.param_groups]
        saved_grads = [flat.grad for _, flat in flats]
        for g in opt.param_groups:
            g["params"], g["lr"] = [], 0.0
        for gid, flat in flats:
            opt.param_groups[gid]["params"].append(flat)
            flat.grad = torch.zeros_like(flat)
        opt.step()
        for g, params, lr in zip(opt.param_groups, saved_params, saved_lrs):
            g["params"], g["lr"] = params, lr
        for (_, flat), grad in zip(flats, saved_grads):
            flat.grad = grad
            step = opt.state[flat].get("step")
            if torch.is_tensor(step):
                step.zero_()
            elif step is not None:
                opt.state[flat]["step"] = 0

    def _link_optimizer_state(self) -> None:
        """Point every parameter's fragment at its slice of the optimizer state.

        ZeRO-1/2 link these lazily after the first step, and only once: when that first step
        ran before every param group had state, later groups stay unlinked. Re-linking is
        cheap and idempotent. ZeRO-3 reads the state directly."""
        if self.stage == 3:
            return
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = self.zero
        for i, flat in self._flat_masters():
            if self.optimizer.state.get(flat):
                lazy_init_hp_params_optimizer_state(
                    zero.bit16_groups[i], flat, self.optimizer.state
                )

    def _state_keys(self) -> list[str]:
        """Per-element optimizer state keys (exp_avg, exp_avg_sq for AdamW)."""
        flat = self._flat_masters()[0][1]
        state = self.optimizer.state[flat]
        return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)

    def _step_value(self) -> torch.Tensor:
        flat = self._flat_masters()[0][1]
        step = self.optimizer.state[flat].get("step", 0)
        return torch.as_tensor(step, dtype=torch.float32).detach().cpu().clone().reshape(())

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._init_optimizer_state()
        self._link_optimizer_state()
        full: dict[int, torch.Tensor] = {}
        model_sd: dict[str, torch.Tensor] = {}
        for fqn, t in self.raw_model.state_dict(keep_vars=True).items():
            if isinstance(t, nn.Parameter) and t.requires_grad:
                if id(t) not in full:
                    # Collective: assembles the fp32 master copy from every rank's fragment.
                    full[id(t)] = safe_get_full_fp32_param(t).detach().float().cpu()
                model_sd[fqn] = full[id(t)]
            else:
                model_sd[fqn] = t.detach().cpu().clone()  # buffers are never partitioned

        keys = self._state_keys()
        step = self._step_value()
        optim_state: dict[str, dict[str, torch.Tensor]] = {}
        for p in self.params:
            fqn = self.param_names[id(p)]
            entry = {"step": step.clone()}
            for key in keys:
                entry[key] = safe_get_full_optimizer_state(p, key).detach().float().cpu()
            optim_state[fqn] = entry
        current = {k: v for k, v in self.optimizer.param_groups[0].items() if k == "lr"}
        groups = [{**meta, **current, "params": list(names)} for meta, names in self.group_meta]
        state: dict[str, Any] = {
            "model": model_sd,
            "optim": {"state": optim_state, "param_groups": groups},
        }
        scaler = getattr(self.zero, "loss_scaler", None)
        if self.dtype == torch.float16 and scaler is not None:
            tracker = getattr(scaler, "cur_iter", 0) - getattr(scaler, "last_overflow_iter", -1)
            state["scaler"] = scaler_state(float(scaler.cur_scale), max(0, tracker - 1))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._init_optimizer_state()
        self._link_optimizer_state()
        dev = self.device
        model_sd, optim = state["model"], state["optim"]
        keys = self._state_keys()
        for p in self.params:
            fqn = self.param_names[id(p)]
            safe_set_full_fp32_param(p, model_sd[fqn].to(dev, torch.float32))
            for key in keys:
                safe_set_full_optimizer_state(p, optim["state"][fqn][key].to(dev), key)
        steps = {float(entry["step"]) for entry in optim["state"].values() if "step" in entry}
        step = max(steps) if steps else 0.0
        for _, flat in self._flat_masters():
            s = self.optimizer.state[flat]
            if torch.is_tensor(s.get("step")):
                s["step"].fill_(step)
            else:
                s["step"] = step
        self._copy_master_to_model()
        self.ds.global_steps = int(step)
        self.ds.global_samples = (
            int(step) * self.cfg.train.micro_batch * self.accum * (self.world_size)
        )
        scaler = getattr(self.zero, "loss_scaler", None)
        if "scaler" in state and scaler is not None and hasattr(scaler, "cur_scale"):
            scaler.cur_scale = float(state["scaler"]["scale"].item())

    def _copy_master_to_model(self) -> None:
        """The fp32 master partitions were written; refresh the weights the model computes
        with (ZeRO-1/2: all-gather the flat groups; ZeRO-3: the local parameter partitions)."""
        if self.stage == 3:
            for i in range(len(self.zero.fp16_groups)):
                self.zero._reassign_or_swap_out_partitioned_parameters(i)
        else:
            self.zero.update_lp_params()

    def save_native(self, path: str) -> None:
        """DeepSpeed's own checkpoint (collective), readable by its `zero_to_fp32.py`."""
        self.ds.save_checkpoint(path, tag=f"global_step{self.ds.global_steps}")

    # -- introspection -------------------------------------------------------------------------
    def memory_breakdown(self) -> dict[str, int]:
        zero = self.zero
        params: list[torch.Tensor] = [p.data for p in self.params]
        params += [p.ds_tensor for p in self.params if hasattr(p, "ds_tensor")]
        grads: list[torch.Tensor | None] = [p.grad for p in self.params]
        for bucket in getattr(zero, "averaged_gradients", {}).values():
            grads += [t for t in (bucket or []) if torch.is_tensor(t)]
        for attr in ("grad_partitions_flat_buffer", "grads_in_partition"):
            t = getattr(zero, attr, None)
            if torch.is_tensor(t):
                grads.append(t)
        masters = [flat for _, flat in self._flat_masters()]
        states = [
            v
            for s in self.optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        ]
        p_bytes = storage_bytes(params)
        g_bytes = storage_bytes(grads)
        return {
            "params": p_bytes,
            "grads": g_bytes,
            "optim": storage_bytes(states),
            # fp32 master partitions, when they are not the model's own storage
            "master": storage_bytes(params + masters) - p_bytes,
            # fp32 gradient partitions the optimizer steps on, when separate from the above
            # (offload: a host-side copy of this rank's gradient partition)
            "master_grads": storage_bytes(grads + [m.grad for m in masters]) - g_bytes,
        }
