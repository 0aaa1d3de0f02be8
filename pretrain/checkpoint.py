"""Atomic, portable checkpoints: everything needed to continue a run exactly.

Layout of `<run.dir>/checkpoints/`:

    step_0000200/
        dcp/                 model + optimizer (+ loss scaler), torch distributed checkpoint,
                             keyed by parameter name: loads at any world size and strategy
        rng/rank_<r>.pt      every rank's RNG states (tensors only)
        train_state.json     step, tokens seen, every rank's data-loader state, W&B run id, ...
        config.yaml          the resolved config of the run that wrote it
        deepspeed/           (ZeRO strategies) DeepSpeed's own format, for `zero_to_fp32`
        COMPLETE             written last: a directory without it is not a checkpoint
    latest                   names the newest complete checkpoint; it moves last

A save writes into `.tmp-step_.../`, syncs every file, and renames the directory into place
only when all ranks are done; a crash at any moment leaves the previous checkpoint and
`latest` untouched. Nothing is unpickled on load: tensors go through DCP or
`torch.load(weights_only=True)`, everything else is JSON or YAML.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from pretrain import dist

# DCP warns on every single-process save/load that it assumes a single process: it is right.
warnings.filterwarnings("ignore", message=".*assuming the intent is to")

COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def _failpoint(name: str) -> None:
    """Crash here, for real (SIGKILL), when PRETRAIN_FAILPOINT names this point.

    Lets tests kill a save at an exact moment instead of racing a timer."""
    if os.environ.get("PRETRAIN_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            _fsync_file(Path(dirpath) / f)
        _fsync_file(Path(dirpath))


def _write_text(path: Path, text: str) -> None:
    """Write and fsync (so that a rename after it publishes complete bytes)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    # Python's generator as a tensor of its 625 words (+ position), so no pickle is needed.
    version, words, gauss = random.getstate()
    state["python"] = torch.tensor(list(words), dtype=torch.int64)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "python" in state:
        random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "train_state.json").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def find_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `none`, `auto` (newest complete one) or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        return resolve(resume)
    # The newest complete checkpoint wins. `latest` names it too, except in the instant
    # between a checkpoint's rename and `latest` moving: a crash there leaves `latest` one
    # behind, and the newer checkpoint is complete, so it is the right one to resume.
    found = list_checkpoints(root)
    return found[-1] if found else None


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def prepare_root(root: Path, resume_from: Path | None, resume: str) -> None:
    """Rank 0, before anything is written: make `root` hold one timeline.

    Leftover `.tmp-*` directories of killed saves are removed. Resuming from an older
    checkpoint of this same run moves the newer ones to `superseded-<step>/`, so that neither
    a later `resume=auto` nor keep-last pruning mixes the two timelines. Starting afresh
    (`resume=none`) over existing checkpoints is refused."""
    if not root.is_dir():
        return
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    existing = list_checkpoints(root)
    if resume_from is None and existing:
        raise CheckpointError(
            f"checkpoint.resume={resume} but {root} already holds checkpoints (newest "
            f"{existing[-1].name}): use another run.dir for a fresh run, or "
            "checkpoint.resume=auto to continue this one"
        )
    if resume_from is not None and resume_from.parent.resolve() == root.resolve():
        newer = [p for p in existing if step_of(p) > step_of(resume_from)]
        if newer:
            aside = root / f"superseded-{step_of(resume_from)}"
            aside.mkdir(exist_ok=True)
            for p in newer:
                os.replace(p, aside / p.name)
            _fsync_file(root)


def save(
    root: Path,
    step: int,
    state: dict[str, Any],
    train_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
    native_saver: Any = None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    try:
        if dist.is_main():
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # a previous attempt that died half way
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
        torch.save(rng_state(), tmp / "rng" / f"rank_{dist.rank()}.pt")
        _fsync_file(tmp / "rng" / f"rank_{dist.rank()}.pt")
        if native_saver is not None:
            native_saver(str(tmp / "deepspeed"))
        dist.barrier()
        _failpoint("checkpoint.after_tensors")
        if dist.is_main():
            _write_text(tmp / "train_state.json", json.dumps(train_state, indent=1))
            _write_text(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            _fsync_tree(tmp)
            _write_text(tmp / COMPLETE, f"{step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_file(root)
            _failpoint("checkpoint.before_latest")
            _write_text(root / f".{LATEST}.tmp", final.name + "\n")
            os.replace(root / f".{LATEST}.tmp", root / LATEST)
            _fsync_file(root)
            # Rename before deleting: a delete cut short must not leave a "complete" husk.
            for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
                doomed = root / f".del-{old.name}"
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    except (OSError, RuntimeError, CheckpointException) as e:
        # torch.save reports a failed write as RuntimeError, DCP as CheckpointException.
        previous = find_resume(root, "auto") if root.is_dir() else None
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"saving checkpoint {final} failed: {e}. The previous checkpoint "
            f"({previous or 'none yet'}) is intact. Check free space, quotas and permissions "
            "under run.dir (or point run.dir at a volume with room), then resume with "
            "checkpoint.resume=auto."
        ) from e
    dist.barrier()
    return final


class Checkpointer:
    """The run's checkpoints: where they live, when one is due, what it holds, and which one a
    restarted run continues from. The loop only reports progress and asks.

    A save holds the engine's tensors in their portable form (`Engine.state_dict`), the train
    state, every rank's data-loader position and RNG, the resolved config, and whatever the
    engine writes in its backend's own format (`Engine.save_native`). One is due every
    `checkpoint.every` steps, at the last step, and whenever the loop must stop early
    (preemption, `train.stop_at_step`), never twice for the same step."""

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any], max_steps: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.every, self.keep_last, self.resume = cfg.every, cfg.keep_last, cfg.resume
        self.config, self.max_steps = config, max_steps
        self.last_saved: int | None = None

    def resume_point(self) -> Path | None:
        """Collective. The checkpoint to continue from (`checkpoint.resume`), after rank 0 made
        the checkpoint directory hold one timeline (`prepare_root`)."""
        found = find_resume(self.root, self.resume)
        if dist.is_main():
            prepare_root(self.root, found, self.resume)
        dist.barrier()
        return found

    def same_run(self, path: Path) -> bool:
        """Whether `path` is one of this run directory's own checkpoints (and not a branch
        point taken from another run)."""
        return path.parent.resolve() == self.root.resolve()

    def restore(self, path: Path, engine: Any) -> dict[str, Any]:
        """Load the engine's state from `path` in place; returns the saved train state."""
        state = engine.state_dict()
        train_state = load(path, state)
        engine.load_state_dict(state)
        self.last_saved = int(train_state["step"])
        return train_state

    def due(self, step: int, *, stop: bool = False) -> bool:
        if step == self.last_saved:
            return False
        return step % self.every == 0 or step == self.max_steps or stop

    def latest(self) -> Path | None:
        return find_resume(self.root, "auto")

    def save(self, step: int, engine: Any, train_state: dict[str, Any], loader: Any) -> Path:
        """Collective: every rank calls it. `loader`'s position is gathered from every rank, so
        that any world size can take the epoch over."""
        train_state = {
            **train_state,
            "step": step,
            "loader": gather_states(loader.state_dict()),
            "world_size": dist.world_size(),
        }
        path = save(
            self.root,
            step,
            engine.state_dict(),
            train_state,
            self.config,
            self.keep_last,
            native_saver=engine.save_native,
        )
        self.last_saved = step
        return path


def gather_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `state` (small, JSON-able), in rank order; a collective."""
    if dist.world_size() == 1:
        return [state]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size()
    tdist.all_gather_object(out, state)
    return out


def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Fill `state` (same structure as the engine's state_dict) in place from `path`.
    Returns the saved train_state."""
    meta = dcp.FileSystemReader(str(path / "dcp")).read_metadata()
    if "scaler" in state and not any(k.startswith("scaler.") for k in meta.state_dict_metadata):
        state.pop("scaler")  # saved without fp16: the loss scaler starts fresh
    try:
        # flatten_sharded_tensors=False: a rank that owns no part of a ZeRO-partitioned tensor
        # holds an empty ShardedTensor for it, which DCP's flattening would drop from its keys
        # (and then mistake the checkpoint for an old format). Nothing here is nested.
        planner = DefaultLoadPlanner(flatten_sharded_tensors=False)
        dcp.load(state, checkpoint_id=str(path / "dcp"), planner=planner)
    except (CheckpointException, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model/optimizer ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). It was written by a run with "
            f"model: {read_config(path).get('model')}. Resume with that model config, or start "
            "a new run.dir."
        ) from e
    return json.loads((path / "train_state.json").read_text())


def restore_rng(path: Path, world_size: int) -> bool:
    """Restore this rank's RNG streams when the world size is the one that saved them (at
    another world size, ranks keep their fresh seeds). Call it last, right before the loop:
    setup steps such as starting DataLoader workers draw from the global generator."""
    train_state = json.loads((path / "train_state.json").read_text())
    rng_file = path / "rng" / f"rank_{dist.rank()}.pt"
    if train_state.get("world_size") != world_size or not rng_file.is_file():
        return False
    set_rng_state(torch.load(rng_file, weights_only=True))
    return True


def read_config(path: Path) -> dict[str, Any]:
    """The resolved config a checkpoint (or a run directory) was written with."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = find_resume(path / "checkpoints", "auto")
        if found is None:
            raise CheckpointError(f"{path} has no complete checkpoint yet")
        path = found
    return yaml.safe_load((path / "config.yaml").read_text())


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint directory or a run directory."""
    p = Path(path)
    if is_complete(p):
        return p
    found = find_resume(p / "checkpoints", "auto") if (p / "checkpoints").is_dir() else None
    if found is None:
        raise CheckpointError(
            f"{p} is neither a complete checkpoint nor a run directory with one: "
            "pass a run directory or one of its checkpoints/step_* directories"
        )
    return found


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict (as saved: fp32 master weights) from any checkpoint, saved
    under any strategy and world size, in this single process."""
    from pretrain.model import GPT, GPTConfig

    ckpt = resolve(path)
    cfg = read_config(ckpt)
    model = GPT(GPTConfig(**cfg["model"]))
    sd = model.state_dict()
    # Load only the model's keys; the optimizer entries in the same checkpoint are skipped.
    state = {"model": sd}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    return state["model"]
