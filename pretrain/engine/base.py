"""What every strategy provides to the training loop: the `Engine` interface.

The loop sees one `Engine`: `micro_step` (forward + backward of one micro-batch),
`optimizer_step` (clip, step, zero), and `state_dict`/`load_state_dict` in one portable,
fully-qualified-name-keyed form that `pretrain.checkpoint` writes with torch's distributed
checkpoint (DCP). Because every strategy speaks that form, a checkpoint saved under one
strategy and world size loads under any other:

    {"model": {fqn: tensor},                      # fp32 weights (DTensor shards under FSDP)
     "optim": {"state": {fqn: {"step", "exp_avg", "exp_avg_sq"}},  # AdamW's (a Muon
               # matrix's: {"step", "momentum_buffer"}; the buffer sharded as its parameter)
               "param_groups": [{hyperparameters..., "params": [fqn, ...]}, ...]},
     "scaler": {"scale", "growth_tracker"}}       # fp16 only

i.e. exactly what `torch.distributed.checkpoint.state_dict.get_model_state_dict` and
`get_optimizer_state_dict` produce for the plain model and a torch optimizer.

`Engine.build` applies parallelism in one order for every strategy (create, activation
checkpointing, compile, `setup`, `init_weights`); everything else is the strategy's
(`torch_engine.TorchEngine` for single, ddp and fsdp*; `zero.ZeroEngine`). The Accelerator an
engine holds is made by `pretrain.engine.process_group.make_accelerator`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import Config
from pretrain.engine.hostmem import release_host_memory, set_mmap_threshold
from pretrain.engine.precision import DTYPES, autocast
from pretrain.model import GPT, GPTConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from pretrain.engine.matrices import MatrixSharding

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Engine(ABC):
    """A model and optimizer wrapped for one strategy."""

    name: str
    accelerator: Accelerator
    model: nn.Module  # wrapped for the strategy (DDP, FSDP, DeepSpeedEngine, or bare)
    raw_model: nn.Module  # the plain GPT inside
    optimizer: torch.optim.Optimizer  # the torch optimizer (not a wrapper)
    scaler: Any  # torch GradScaler/ShardedGradScaler (enabled for fp16 only); unused by ZeRO

    def __init__(self, cfg: Config, accelerator: Accelerator, accum: int = 1) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.device = accelerator.device
        self.dtype = DTYPES[cfg.precision.dtype]
        self.accum = accum  # micro-batches per optimizer step
        self.name = cfg.strategy.name
        self.num_params = 0  # of the plain model (a tied matrix once); set by build()
        self.why = ""  # how the strategy was chosen (create_engine), for the banner
        self._skeleton: GPT | None = None  # the model on the meta device; set by build()
        # Whether freed host blocks above train.host_mmap_threshold_kib go straight back to the
        # OS (set by build()).
        self.host_blocks_return = False

    # -- process facts ----------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def autocast(self) -> contextlib.AbstractContextManager:
        """Compute in the precision's dtype (`precision.autocast`; nothing for fp32)."""
        return autocast(self.device, self.dtype)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (a collective: call on all)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    @property
    def skips_overflow_steps(self) -> bool:
        """True when a non-finite gradient norm is expected now and then: fp16's loss scaler
        skips such a step and lowers the scale, by design. Elsewhere it means divergence."""
        return self.dtype == torch.float16

    # -- the strategy ----------------------------------------------------------------------
    def build(self, model_cfg: GPTConfig, make_optimizer: OptimizerFactory) -> None:
        """Create the model and apply parallelism to it, in this order: create (on the meta
        device, or partitioned as it is created, so no rank allocates what it will not keep:
        `create`), activation checkpointing, compile, wrap or shard with the optimizer
        (`setup`), then initialise each rank's part from `run.seed` (`init_weights`): the
        same initial weights as a single process, under every strategy and world size."""
        # Before the model's memory exists.
        self.host_blocks_return = set_mmap_threshold(self.cfg.train.host_mmap_threshold_kib)
        with torch.device("meta"):
            self._skeleton = GPT(model_cfg)  # names, shapes, init rules; no memory
        model = self.create(model_cfg)
        self.num_params = self.skeleton.num_params()
        model.activation_checkpointing = self.cfg.train.activation_checkpointing
        if self.cfg.train.compile:
            # In place: parameter names (and so checkpoints) stay those of the plain model.
            model.compile()
        self.setup(model, make_optimizer)
        self.init_weights(self.cfg.run.seed)
        release_host_memory()

    def create(self, model_cfg: GPTConfig) -> GPT:
        """The model, without memory: on the meta device. `setup` gives it storage (whole, or
        only this rank's shards) and `init_weights` its values."""
        with torch.device("meta"):
            return GPT(model_cfg)

    def adopt(self, model: nn.Module) -> None:
        """Start `setup`: remember the plain model (and a meta copy of it, for the names,
        shapes and initial values of its parameters, if `build` did not make one)."""
        self.raw_model = model
        if self._skeleton is None:
            with torch.device("meta"):
                self._skeleton = GPT(model.cfg)  # type: ignore[arg-type]

    @property
    def skeleton(self) -> GPT:
        """The model on the meta device: its parameters' names, shapes and initial values,
        whatever the strategy has made of the real ones (DTensors, ZeRO partitions)."""
        if self._skeleton is None:
            raise RuntimeError("Engine.build (or setup) has not run yet")
        return self._skeleton

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Wrap `model` for the strategy (a meta model gets this rank's storage; a real one
        keeps its values), then build its optimizer (after sharding)."""

    def matrix_sharding(self) -> MatrixSharding | None:
        """Where the pieces of each matrix the optimizer holds live, for an optimizer that needs
        whole matrices (Muon; `pretrain/engine/matrices.py`). None: the optimizer holds every
        matrix whole (single, ddp). Collective where it is not None: call on every rank."""
        return None

    def share_matrices(self) -> None:
        """Hand the optimizer the matrix sharding if it asks for one (`set_matrix_sharding`):
        the last stage of `setup`, once the optimizer holds what it will step."""
        hook = getattr(self.optimizer, "set_matrix_sharding", None)
        if callable(hook):
            hook(self.matrix_sharding())

    def init_weights(self, seed: int) -> None:
        """Give every parameter its initial value, `GPT.initial_value(name, seed)`: each rank
        computes one full parameter at a time and keeps its own part of it, so memory beyond
        the shards is one parameter, whatever the model size and world size."""
        skeleton = self.skeleton
        self._load_full((name, skeleton.initial_value(name, seed)) for name in self._param_names())

    def load_model_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load full (unsharded) model weights, `GPT.state_dict()`'s keys and shapes (a tied
        matrix under either or both of its names), into the wrapped model under any strategy:
        each rank keeps its own part. The optimizer state is untouched. Every rank must pass
        the same weights (e.g. each reads the same file)."""
        names = self._param_names()
        aliases = set(self.skeleton.state_dict()) - set(names)
        missing = [n for n in names if n not in state_dict]
        unexpected = sorted(set(state_dict) - set(names) - aliases)
        if missing or unexpected:
            raise ValueError(
                f"load_model_weights: the weights do not match the model (missing {missing}, "
                f"unexpected {unexpected}): pass a state dict of GPT({self.skeleton.cfg})"
            )
        shapes = dict(self.skeleton.named_parameters())
        for name in names:
            if tuple(state_dict[name].shape) != tuple(shapes[name].shape):
                raise ValueError(
                    f"load_model_weights: {name} has shape {tuple(state_dict[name].shape)}, "
                    f"the model's is {tuple(shapes[name].shape)}"
                )
        self._load_full((name, state_dict[name]) for name in names)

    def _param_names(self) -> list[str]:
        """Names of the model's parameters, a tied matrix once (named_parameters() order)."""
        return [name for name, _ in self.skeleton.named_parameters()]

    @abstractmethod
    def _load_full(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors, one (name, value) at a time, into this rank's part of each
        parameter (every rank passes the same values)."""

    @abstractmethod
    def micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch x, y: [B, T]; gradients accumulate until
        `optimizer_step`. `last` marks the final micro-batch of a step (sync gradients now).
        Returns the micro-batch's mean loss, detached, unscaled."""

    @abstractmethod
    def optimizer_step(self, lr: float, max_norm: float) -> torch.Tensor:
        """Set the learning rate, clip (max_norm > 0), step and zero the gradients.
        Returns the global gradient norm before clipping (a 0-dim tensor)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """{"model": ..., "optim": ..., ["scaler": ...]} keyed by parameter names, in the form
        of the module docstring (DCP-ready: this rank's shards, as DTensors or sharded
        tensors where the strategy shards)."""

    @abstractmethod
    def model_state_dict(self) -> dict[str, Any]:
        """The "model" part of `state_dict()` alone: this rank's part of the fp32 weights, by
        parameter name (no optimizer state is created for it)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`; `state` has the structure `state_dict()` returned."""

    def save_native(self, path: str) -> None:  # noqa: B027 - optional hook
        """Also save the backend's own checkpoint format (DeepSpeed writes one)."""

    def stage_native(self, path: str) -> Callable[[], None] | None:
        """`save_native` for a background save (collective): copy what the backend's files
        hold into host memory now, and return the function that writes them to `path` later,
        on another thread, with no collectives. None: the backend has no files of its own."""
        return None

    @abstractmethod
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of x, y [B, T] (targets -1 ignored) in eval mode, without gradients,
        in the run's precision: detached, fp32, 0-dim."""

    def unwrapped(self) -> nn.Module:
        return self.raw_model

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    # -- introspection (tests, benchmarks) -------------------------------------------------
    @abstractmethod
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds right now, measured from the live tensors (not formulas):
        params (the model's parameters, local shards only), grads, optim (optimizer state
        such as exp_avg/exp_avg_sq), master and master_grads (separate fp32 master weights and
        their gradients, if the strategy keeps any: DeepSpeed does).
        Call it between the last micro_step and optimizer_step to see gradients."""
