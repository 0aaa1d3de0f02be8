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

Creation: ZeRO-3 builds the model inside DeepSpeed's `zero.Init` (each module partitioned as
it is created); ZeRO-1/2 (which keep whole 16-bit weights on every rank) from the meta device
straight in the compute dtype. Either way each rank then writes its own part of the exact fp32
initial values into its master partition (`init_weights`).

Portable, sharded state: `state_dict` presents each rank's own fragments of the fp32 master
weights and of AdamW's moments (views into DeepSpeed's flat partitions, found through the one
adapter over DeepSpeed's internals, `deepspeed_state.py`) as ShardedTensors of each parameter's
full shape (`fragments.py`), keyed by parameter name exactly as `get_model_state_dict` /
`get_optimizer_state_dict` key the plain model. DCP writes each rank's partition and reads into
it in place: no rank gathers a full weight or moment at save or resume, and the checkpoint still
loads under FSDP, DDP or one process, at any world size, and vice versa. `save_native` also
writes DeepSpeed's own checkpoint (its partitions, with its `zero_to_fp32.py`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import Config, ConfigError
from pretrain.engine.base import Engine, OptimizerFactory
from pretrain.engine.deepspeed_state import DeepSpeedState, Fragment
from pretrain.engine.fragments import Layout, fragment_tensor, local_pieces
from pretrain.engine.hostmem import release_host_memory
from pretrain.engine.matrices import MatrixPieces, MatrixSharding
from pretrain.engine.measure import storage_bytes
from pretrain.engine.precision import scaler_state
from pretrain.engine.staging import Stager
from pretrain.engine.strategies import STAGES, zero_bucket_elements
from pretrain.model import GPT, GPTConfig

# DeepSpeed 0.19 calls torch collectives that torch 2.13 has deprecated, once per bucket per step.
warnings.filterwarnings(
    "ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning
)

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
    bucket = zero_bucket_elements(cfg.model.n_embd, cfg.strategy.reduce_bucket_size)
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
            # Gathered parameters are released as soon as their module is done (DeepSpeed's
            # 1e9-element defaults keep every parameter of a smaller model gathered between
            # forward and backward: the whole 16-bit model on every rank).
            stage3_max_live_parameters=2 * bucket,
            stage3_max_reuse_distance=bucket,
            # The optimizer steps the fp32 partition one sub-group at a time, each with an fp32
            # copy of its gradients and AdamW's temporaries (about 14 bytes per element): in
            # one sub-group of 1e9 elements (DeepSpeed's default) that is 14 bytes for every
            # parameter a rank owns, more than its Adam state.
            sub_group_size=bucket,
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


class DeferredWrites:
    """A DeepSpeed checkpoint engine that stages: `save(state_dict, path)` copies the state
    dict into host buffers (one `Stager` per file name, reused from save to save) and
    remembers the path; `write()` then writes every file with torch.save, as DeepSpeed's own
    torch engine does. Everything else is the wrapped engine's."""

    def __init__(self, inner: Any, stagers: dict[str, Stager]) -> None:
        self.inner = inner
        self.stagers = stagers
        self.files: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def preserves_storage_sharing(self) -> bool:
        return False  # staging copies every tensor: DeepSpeed need not clone them first

    def save(self, state_dict: Any, path: str) -> None:
        stager = self.stagers.setdefault(os.path.basename(path), Stager())
        self.files.append((path, stager.stage(state_dict)))

    def write(self) -> None:
        zipfile = getattr(self.inner, "zipfile_serialization", True)
        for path, state in self.files:
            torch.save(state, path, _use_new_zipfile_serialization=zipfile)


class ZeroEngine(Engine):
    def __init__(self, cfg: Config, accelerator: Any, accum: int = 1) -> None:
        super().__init__(cfg, accelerator, accum)
        self.stage = STAGES[self.name]
        self._layout: dict[str, Layout] | None = None
        self._trim_armed = False  # see `_trim_heap_in_backward`
        self._native_stagers: dict[str, Stager] = {}  # see `stage_native`

    # -- build ------------------------------------------------------------------------------
    def create(self, model_cfg: GPTConfig) -> GPT:
        """ZeRO-3: created inside DeepSpeed's `zero.Init`, which partitions each module's
        parameters as soon as the module exists, so no rank ever holds more than one module
        whole (their values are set by `init_weights`). ZeRO-1/2 keep the whole 16-bit model
        on every rank: on the meta device until `setup`."""
        if self.stage != 3:
            return super().create(model_cfg)
        import deepspeed

        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        with deepspeed.zero.Init(config_dict_or_path=ds):
            return GPT(model_cfg, init=False)

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.adopt(model)
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        user = (
            read_user_config(self.cfg.strategy.deepspeed_config)
            if self.cfg.strategy.deepspeed_config
            else {}
        )
        owned = {k: v for k, v in user.items() if k in LOOP_OWNED}
        check_geometry(merge(ds, owned), self.cfg, self.world_size, self.accum)
        self.accelerator.gradient_accumulation_steps = self.accum
        if any(p.is_meta for p in model.parameters()):
            # Straight into the compute dtype: DeepSpeed would cast an fp32 copy anyway.
            model.to(self.dtype).to_empty(device=self.device)

        # Names of the parameters, taken before DeepSpeed re-points the optimizer at its flat
        # partitions: the first name of a tied parameter, as torch's state-dict API uses.
        self.param_names: dict[int, str] = {}
        for fqn, p in model.named_parameters():
            self.param_names.setdefault(id(p), fqn)
        client = self._client_optimizer(model, make_optimizer)
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
        self.internals = DeepSpeedState(self.ds, self.params)
        self.zero: Any = self.internals.zero  # DeepSpeedZeroOptimizer(_Stage3)
        self.optimizer = self.zero.optimizer  # our torch AdamW, now over flat fp32 partitions
        self.share_matrices()
        # Allocated zeroed; first written in backward. In host memory, the heap's freed blocks
        # make room for it there (`_trim_heap_in_backward`): where the activations are in host
        # memory too (not a GPU's, under zero3_offload), and where they do not go back to the
        # OS anyway (train.host_mmap_threshold_kib).
        self._trim_armed = self.internals.release_gradient_pages() > 0
        host_activations = self.device.type == "cpu" and not self.host_blocks_return
        if self._trim_armed and host_activations and self.cfg.strategy.trim_heap_in_backward:
            self._trim_heap_in_backward()

    def _trim_heap_in_backward(self) -> None:
        """Give the host memory backward has freed so far back to the OS as each block's
        backward begins (`release_host_memory`), while the gradient partition's released pages
        come back as backward writes them.

        Why: backward frees the activations block by block while it fills the gradient
        partition. FSDP's per-parameter gradients are new allocations, which the C heap serves
        from those freed blocks; DeepSpeed's partition is one buffer allocated at setup, whose
        pages the OS must supply, so the freed activations would stay resident in the heap
        next to it, and the rank's peak would hold both. Trimmed here, the OS hands the same
        pages over. Only in the first backward after the pages were released (`_trim_armed`):
        with gradient accumulation the partition stays resident from then to the step, and a
        trim would only cost. The cost is one malloc_trim per block and the page faults of the
        next forward, which reuses the trimmed heap: 0.90 of the throughput at 153M parameters
        in bf16, 0.84 at 20M in fp32, for 24-27% and 12% less peak RSS (BENCHMARKS.md); hence
        `strategy.trim_heap_in_backward`."""

        def trim(grad: torch.Tensor) -> None:
            if self._trim_armed:
                release_host_memory()

        def on_output(_: nn.Module, __: Any, out: Any) -> None:
            armed = self._trim_armed and torch.is_grad_enabled()
            if armed and torch.is_tensor(out) and out.requires_grad:
                out.register_hook(trim)

        blocks: nn.ModuleList = self.raw_model.transformer.h  # type: ignore[union-attr,assignment]
        self._trim_hooks = [block.register_forward_hook(on_output) for block in blocks]

    def _client_optimizer(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> torch.optim.Optimizer:
        """Our torch optimizer over `model`'s parameters. A ZeRO-3 parameter created
        partitioned has an empty `.data`, so the optimizer's choices that depend on shapes
        (which parameters decay) are made on the meta copy, then pointed at the real ones."""
        if self.stage != 3:
            return make_optimizer(model)
        real = dict(model.named_parameters())
        twin_to_real = {id(p): real[name] for name, p in self.skeleton.named_parameters()}
        client = make_optimizer(self.skeleton)
        for group in client.param_groups:
            group["params"] = [twin_to_real[id(p)] for p in group["params"]]
        return client

    @torch.no_grad()
    def _load_full(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write each rank's fragment of the fp32 master weights from full tensors, then the
        16-bit weights from the masters: the masters are exact (in bf16 DeepSpeed would have
        made them from the rounded 16-bit weights)."""
        params = dict(self.raw_model.named_parameters())
        for name, full in items:
            frag = self.internals.fragment(params[name])
            if frag is not None:
                flat = full.reshape(-1).narrow(0, frag.start, frag.numel)
                frag.master.copy_(flat.to(frag.master.device, torch.float32))
        self.internals.copy_master_to_model()

    # -- training ---------------------------------------------------------------------------
    def micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        # The boundary decides whether this backward reduces (zero1) / finishes the
        # reduce-scatter (zero2/3) and whether step() applies the update.
        self.ds.set_gradient_accumulation_boundary(last)
        _, loss = self.model(x, y)
        try:
            self.ds.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps
        finally:
            self._trim_armed = False  # the gradient partition is resident until the step
        return loss.detach().float()

    def optimizer_step(self, lr: float, max_norm: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.internals.set_clip(max_norm)
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        # Resident again only in the next backward.
        self._trim_armed = self.internals.release_gradient_pages() > 0
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

    # -- portable state, sharded ---------------------------------------------------------------
    def _init_optimizer_state(self) -> None:
        """Create AdamW's state on the flat partitions if no step was taken yet (as torch's
        state-dict API does: a step with zero gradients and lr 0, which moves nothing), one
        partition at a time so that the zero gradient and the step's temporaries exist for one
        partition only."""
        opt = self.optimizer
        flats = self.internals.flat_masters()
        if all(opt.state.get(flat) for _, flat in flats):
            return
        saved_params = [g["params"] for g in opt.param_groups]
        saved_lrs = [g["lr"] for g in opt.param_groups]
        for gid, flat in flats:
            if opt.state.get(flat):
                continue
            for g in opt.param_groups:
                g["params"], g["lr"] = [], 0.0
            opt.param_groups[gid]["params"] = [flat]
            saved_grad, flat.grad = flat.grad, torch.zeros_like(flat)
            opt.step()
            flat.grad = saved_grad
            step = opt.state[flat].get("step")
            if torch.is_tensor(step):
                step.zero_()
            elif step is not None:
                opt.state[flat]["step"] = 0
        for g, params, lr in zip(opt.param_groups, saved_params, saved_lrs):
            g["params"], g["lr"] = params, lr

    def _state_keys(self) -> dict[str, list[str]]:
        """Per-element optimizer state keys of every parameter, by name (exp_avg, exp_avg_sq for
        AdamW; momentum_buffer for Muon): those of its param group's flat partition, which every
        rank has, whether or not it holds a fragment of the parameter."""
        by_group: dict[int, list[str]] = {}
        for gid, flat in self.internals.flat_masters():
            state = self.optimizer.state[flat]
            by_group[gid] = sorted(
                k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape
            )
        return {
            name: by_group[gid] for gid, (_, names) in enumerate(self.group_meta) for name in names
        }

    def matrix_sharding(self) -> MatrixSharding:
        """The matrices behind each flat partition of a Muon group (`deepspeed_state.flat_groups`),
        with every rank's fragment of each (`layout`: one all-gather, the first time) and this
        rank's offset into its partition. Over the data-parallel group (all ranks)."""
        layout, fragments = self.layout(), self._fragments()
        shapes = {name: p.shape for name, p in self.skeleton.named_parameters()}
        by_flat: dict[int, list[MatrixPieces]] = {}
        for gid, flat, params in self.internals.flat_groups():
            if self.group_meta[gid][0].get("kind") != "muon":
                continue
            entries = []
            for p in params:
                name = self.param_names[id(p)]
                assert all(len(r) <= 1 for r in layout[name]), name  # one range per rank
                ranges = [r[0] if r else (0, 0, "") for r in layout[name]]
                frag = fragments[name]
                entries.append(
                    MatrixPieces(
                        name,
                        (int(shapes[name][0]), int(shapes[name][1])),
                        tuple(start for start, _, _ in ranges),
                        tuple(numel for _, numel, _ in ranges),
                        0 if frag is None else frag.offset,
                    )
                )
            by_flat[id(flat)] = entries

        def matrices(held: torch.Tensor) -> list[MatrixPieces]:
            return by_flat[id(held)]

        return MatrixSharding(self.rank, self.world_size, matrices, None, self.device)

    def _step_value(self) -> torch.Tensor:
        flat = self.internals.flat_masters()[0][1]
        step = self.optimizer.state[flat].get("step", 0)
        return torch.as_tensor(step, dtype=torch.float32).detach().cpu().clone().reshape(())

    def _fragments(self) -> dict[str, Fragment | None]:
        """This rank's fragment of every parameter, by name (a tied matrix once)."""
        return {self.param_names[id(p)]: self.internals.fragment(p) for p in self.params}

    def layout(self) -> dict[str, Layout]:
        """Every rank's fragment of every parameter (name -> per rank [(start, numel,
        device)]): one all-gather, the first time (partitions never move)."""
        if self._layout is None:
            mine = {
                name: [] if f is None else [(f.start, f.numel, str(f.master.device))]
                for name, f in self._fragments().items()
            }
            everyone: list[Any] = [mine]
            if self.world_size > 1:
                everyone = [None] * self.world_size
                torch.distributed.all_gather_object(everyone, mine)
            self._layout = {name: [r[name] for r in everyone] for name in mine}
        return self._layout

    def _sharded(self, name: str, frag: Fragment | None, view: torch.Tensor | None) -> Any:
        """Parameter `name`'s tensor (its full shape) with this rank's `view` of `frag` as
        local shards: a ShardedTensor over DeepSpeed's own storage."""
        shape = self.skeleton.get_parameter(name).shape
        pieces = [] if frag is None or view is None else [(frag.start, view)]
        return fragment_tensor(shape, pieces, self.layout()[name])

    def model_state_dict(self) -> dict[str, Any]:
        """The fp32 master weights, each rank's own fragments as views (see `state_dict`)."""
        canonical = {id(p): name for name, p in self.skeleton.named_parameters()}
        weights = {
            name: self._sharded(name, f, None if f is None else f.master)
            for name, f in self._fragments().items()
        }
        model_sd: dict[str, Any] = {}
        for fqn, t in self.skeleton.state_dict(keep_vars=True).items():
            if id(t) in canonical and canonical[id(t)] in weights:
                model_sd[fqn] = weights[canonical[id(t)]]  # a tied name: the same tensor
            else:  # buffers are never partitioned
                model_sd[fqn] = self.raw_model.state_dict()[fqn].detach().cpu().clone()
        return model_sd

    def state_dict(self) -> dict[str, Any]:
        """The portable state with every tensor a view of this rank's own partition: model
        weights are the fp32 masters, optimizer state AdamW's flat state, each presented to DCP
        under its parameter's full shape (`fragment_tensor`). Nothing is gathered or copied;
        DCP writes each rank's elements, and `Checkpointer.restore` loads into them in place."""
        self._init_optimizer_state()
        keys, step = self._state_keys(), self._step_value()
        state = self.optimizer.state
        optim_state: dict[str, dict[str, Any]] = {}
        for name, f in self._fragments().items():
            entry: dict[str, Any] = {"step": step.clone()}
            for key in keys[name]:
                view = None if f is None else state[f.flat][key].narrow(0, f.offset, f.numel)
                entry[key] = self._sharded(name, f, view)
            optim_state[name] = entry
        current = {k: v for k, v in self.optimizer.param_groups[0].items() if k == "lr"}
        groups = [{**meta, **current, "params": list(names)} for meta, names in self.group_meta]
        out: dict[str, Any] = {
            "model": self.model_state_dict(),
            "optim": {"state": optim_state, "param_groups": groups},
        }
        scale = self.internals.loss_scale()
        if self.dtype == torch.float16 and scale is not None:
            out["scaler"] = scaler_state(*scale)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`. After DCP loaded into the views `state_dict()` returned,
        the fragments already hold the values and only the derived state is refreshed; values
        from elsewhere (full tensors, or other ShardedTensors of ours) are copied in."""
        self._init_optimizer_state()
        shapes = {name: p.shape for name, p in self.skeleton.named_parameters()}
        model_sd, optim = state["model"], state["optim"]
        keys = self._state_keys()
        for name, frag in self._fragments().items():
            if frag is None:
                continue
            copy_fragment(frag.master, frag.start, model_sd[name], shapes[name])
            for key in keys[name]:
                view = self.optimizer.state[frag.flat][key].narrow(0, frag.offset, frag.numel)
                copy_fragment(view, frag.start, optim["state"][name][key], shapes[name])
        steps = {float(entry["step"]) for entry in optim["state"].values() if "step" in entry}
        step = max(steps) if steps else 0.0
        for _, flat in self.internals.flat_masters():
            s = self.optimizer.state[flat]
            if torch.is_tensor(s.get("step")):
                s["step"].fill_(step)
            else:
                s["step"] = step
        self.internals.copy_master_to_model()
        samples = int(step) * self.cfg.train.micro_batch * self.accum * self.world_size
        self.internals.set_progress(int(step), samples)
        if "scaler" in state:
            self.internals.set_loss_scale(float(state["scaler"]["scale"].item()))

    def save_native(self, path: str) -> None:
        """DeepSpeed's own checkpoint (collective), readable by its `zero_to_fp32.py`: each
        rank writes its own partition."""
        self.ds.save_checkpoint(path, tag=f"global_step{self.ds.global_steps}")

    def stage_native(self, path: str) -> Callable[[], None]:
        """DeepSpeed's own checkpoint, staged: DeepSpeed runs its save as always (its
        collectives, its small files), but with a checkpoint engine that copies each state
        dict it is given into host buffers (`DeferredWrites`) instead of writing it; the
        returned function writes them, the same files `save_native` writes."""
        deferred = DeferredWrites(self.ds.checkpoint_engine, self._native_stagers)
        self.ds.checkpoint_engine = deferred
        try:
            self.save_native(path)
        finally:
            self.ds.checkpoint_engine = deferred.inner
        return deferred.write

    # -- introspection -------------------------------------------------------------------------
    def memory_breakdown(self) -> dict[str, int]:
        params = self.internals.param_tensors()
        grads = self.internals.grad_tensors()
        masters = [flat for _, flat in self.internals.flat_masters()]
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


def copy_fragment(dst: torch.Tensor, start: int, src: torch.Tensor, shape: torch.Size) -> None:
    """Fill `dst`, a parameter's elements [start, start + dst.numel()) flattened, from `src`:
    the full tensor, or a ShardedTensor whose local shards are boxes of those elements (as
    `state_dict` made them). A shard that already is `dst`'s storage (DCP loaded into it)
    is left alone."""
    for offsets, piece in local_pieces(src):
        if piece.dim() == len(shape) and tuple(piece.shape) == tuple(shape):
            dst.copy_(piece.reshape(-1).narrow(0, start, dst.numel()))  # the full tensor
            continue
        first = sum(o * math.prod(shape[i + 1 :]) for i, o in enumerate(offsets))
        target = dst.narrow(0, first - start, piece.numel())
        if target.data_ptr() != piece.data_ptr():
            target.copy_(piece.reshape(-1))
