"""The process group's life, in one place: device, environment, start, reset and teardown.

    device       `pick_device`: cuda or cpu, which decides the backend (nccl or gloo)
    environment  torchrun's variables describe the group; `adopt_slurm_tasks` writes them when
                 Slurm started every rank itself, `lone_process_group_env` for a group of one
                 in a lone process (the sharded strategies need one)
    start        `make_accelerator`: the Accelerator creates the group (and picks the device);
                 `ensure_process_group` starts it where no Accelerator did (FSDP in a lone
                 process)
    reset        `reset_accelerate_state`: forget Accelerate's singletons, to make another
                 Accelerator in this process (a DeepSpeed fallback, the next trial of a sweep)
    teardown     `destroy`: end the group on the way out of a run

Rank facts that need no process group (rank, world size, is_main) and the watcher that stops
every rank when one fails are `pretrain.dist`'s. Accelerate is imported only where an
Accelerator is made or reset, so that importing the engine package does not load it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import MutableMapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pretrain import dist as pdist
from pretrain.config import Config

if TYPE_CHECKING:
    from accelerate import Accelerator


# -- device ----------------------------------------------------------------------------------


def pick_device(cfg: Config) -> str:
    """The device type `train.device` asks for ("auto": cuda when one is visible, else cpu)."""
    want = cfg.train.device
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible: use train.device=cpu")
    return want


# -- environment -----------------------------------------------------------------------------


def adopt_slurm_tasks(env: MutableMapping[str, str] | None = None) -> bool:
    """Describe the process group in torchrun's variables when Slurm started every rank itself
    (`srun` with several tasks, as Hydra's submitit launcher does) and no torchrun is in
    between. Returns whether it did. Under torchrun (RANK set) nothing changes.

    The rendezvous is the first node of the allocation, on a port derived from the job id, so
    that two jobs on the same nodes never share one (the rule launch/slurm/train.sbatch uses)."""
    env = os.environ if env is None else env
    # The step's task count: SLURM_NTASKS is also set in a batch script, which is one process.
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" in env or "SLURM_PROCID" not in env or ntasks < 2:
        return False
    nodes = int(env.get("SLURM_STEP_NUM_NODES", "1") or 1)
    env.update(
        RANK=env["SLURM_PROCID"],
        WORLD_SIZE=str(ntasks),
        LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        LOCAL_WORLD_SIZE=str(max(1, ntasks // max(1, nodes))),
        MASTER_ADDR=env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "")),
        MASTER_PORT=env.get("MASTER_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 40000),
    )
    return True


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`n[1-2],m3` -> `n1`), as `scontrol show hostnames`
    would print it first."""
    import re

    m = re.match(r"([^,\[]+)(?:\[(\d+)[^\]]*\])?", nodelist.strip())
    if not m:
        return "127.0.0.1"
    return m.group(1) + (m.group(2) or "")


def lone_process_group_env() -> None:
    """A lone `python -m pretrain.train` (no torchrun, no accelerate launch) with a sharded
    strategy: describe a 1-rank process group in the environment (as torchrun would), so that
    DeepSpeed does not go looking for MPI and FSDP has a group to shard over (of size 1)."""
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


# -- start -----------------------------------------------------------------------------------


def make_accelerator(cfg: Config, **kwargs: Any) -> Accelerator:
    """The Accelerator owns process-group setup (torchrun/accelerate/Slurm env) and the device.

    On CPU the process group must be gloo; the collective timeout is what makes a dead rank
    fail the job instead of hanging it. With a DeepSpeed plugin, `cpu=True` is not passed: the
    gloo process group alone keeps DeepSpeed on CPU."""
    # Imported here, not above: this module (and so the engine package) loads without Accelerate.
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = pick_device(cfg) == "cpu"
    pg = InitProcessGroupKwargs(
        backend="gloo" if cpu else "nccl", timeout=timedelta(seconds=cfg.dist.timeout_s)
    )
    use_cpu_flag = cpu and "deepspeed_plugin" not in kwargs
    # Precision is `precision=`'s business alone: an ACCELERATE_MIXED_PRECISION left in the
    # environment by `accelerate launch` must not add a second autocast around the model.
    kwargs.setdefault("mixed_precision", "no")
    # Only a launched multi-process job gets process-group kwargs: given a backend, Accelerate
    # assumes a process group exists even in a lone `python -m pretrain.train`. DeepSpeed always
    # runs in a process group (one rank in a lone process, see `lone_process_group_env`).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "deepspeed_plugin" in kwargs
    # The launcher's DeepSpeed/FSDP choice was read into the strategy already
    # (engine/launcher.py); left in the environment, it would turn Accelerate's own
    # DeepSpeed/FSDP plugin on underneath ours.
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        if "deepspeed_plugin" not in kwargs:
            os.environ.pop(var, None)
    return Accelerator(cpu=use_cpu_flag, kwargs_handlers=[pg] if launched else [], **kwargs)


def ensure_process_group(cfg: Config) -> None:
    """Start the (1-rank) process group `lone_process_group_env` described, if nobody did."""
    if dist.is_initialized():
        return
    cpu = pick_device(cfg) == "cpu"
    dist.init_process_group(
        backend="gloo" if cpu else "nccl", timeout=timedelta(seconds=cfg.dist.timeout_s)
    )


# -- reset and teardown ----------------------------------------------------------------------


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (and the DeepSpeed switch an Accelerator with
    a DeepSpeed plugin leaves in the environment), so that another Accelerator can be made in
    this process. The torch process group, if any, is kept and reused."""
    from accelerate.state import AcceleratorState, GradientState

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def destroy() -> None:
    """End this process's torch process group, if it has one: the last thing a run does, and
    best effort (a peer that failed may have taken the group down with it)."""
    if pdist.initialized():
        with contextlib.suppress(Exception):  # best effort on the way out
            dist.destroy_process_group()
