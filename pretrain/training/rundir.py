"""The run directory's own files: the resolved config and the tokenizer copy.

`<run.dir>/config.yaml` is the resolved config (W&B gets the same dict), rewritten at every
start; the run's copy of the data's tokenizer (`<run.dir>/tokenizer.model` for sentencepiece,
`<run.dir>/tokenizer/` holding tokenizer.json and its config files for a Hugging Face one: the
data dir's layout, `pretrain.tokenizer.load`), taken at the first start, lets a run sample,
evaluate and export without its data dir, and a resumed run pointed at shards made with another
tokenizer (compared by content hash) is refused instead of training on noise. Metrics and
checkpoints have their own homes (`pretrain/metrics.py`, `pretrain/checkpoint.py`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pretrain import dist
from pretrain.config import Config, ConfigError, to_dict
from pretrain.data.format import DataError, Manifest
from pretrain.data.shards import data_tokenizer
from pretrain.model import GPTConfig
from pretrain.sweep.lock import hold_run_dir, holds_run_dir, release_run_dir
from pretrain.tokenizer import (
    TokenizerError,
    find_tokenizer,
    load_tokenizer,
    write_atomic,
)


class RunDir:
    """The run directory, and the resolved config that it, W&B and every checkpoint hold."""

    def __init__(self, path: Path, resolved: dict[str, Any], tokenizer_sha256: str) -> None:
        self.path = path
        self.resolved = resolved
        self.tokenizer_sha256 = tokenizer_sha256  # what the training data's tokenizer must be
        self.owns_lock = False  # rank 0 took the run dir's lock in `create`

    @classmethod
    def create(cls, cfg: Config, model_cfg: GPTConfig, manifest: Manifest) -> RunDir:
        """Collective. Rank 0 takes the run dir's lock (one trainer per run dir), writes the
        resolved config (with the vocabulary taken from the data) and, once, the tokenizer copy;
        every rank learns the tokenizer hash the data must have: the copy's, once there is one."""
        path = Path(cfg.run.dir)
        owns = False  # a sweep's trial may hold the run dir already: it releases it then
        if dist.is_main() and not holds_run_dir(path):
            holder = hold_run_dir(path)
            if holder is not None:
                raise ConfigError(
                    f"run.dir={path} is in use by a live run ({holder}): two trainers would "
                    "write the same checkpoints and metrics. Wait for it to end or stop it, or "
                    "give this run another run.dir"
                )
            owns = True
        resolved = to_dict(cfg)  # type: ignore[arg-type]
        # The model as built: the vocabulary taken from the data, or a source's architecture.
        resolved["model"] = dataclasses.asdict(model_cfg)
        run_tok = find_tokenizer(path) if path.is_dir() else None
        try:
            own = load_tokenizer(run_tok) if run_tok else None
        except TokenizerError as e:
            raise DataError(f"the run's tokenizer copy is damaged: {e}") from e
        expected = own.sha256 if own is not None else manifest.tokenizer_sha256
        if own is not None and own.sha256 != manifest.tokenizer_sha256:
            # Before anything is written: the data was tokenized for another model.
            data = manifest.describe_tokenizer()
            raise DataError(
                f"this run was trained with {own.describe()} but {manifest.source} was "
                f"prepared with {data}: prepare the data with the run's tokenizer (python -m "
                f"pretrain.prepare input=<your corpus> output=<new dir> tokenizer.path="
                f"{run_tok}), or start a new run.dir for this data"
            )
        dist.barrier()
        run_dir = cls(path, resolved, expected)
        run_dir.owns_lock = owns
        run_dir.write_config()
        if dist.is_main() and run_tok is None:
            data_tokenizer(manifest, allow_pipe=cfg.data.allow_pipe).save(path)
        dist.barrier()
        return run_dir

    def release(self) -> None:
        """Rank 0: give the run dir's lock back at the end of the run, if `create` took it."""
        if self.owns_lock:
            release_run_dir(self.path)

    def write_config(self) -> None:
        """Rank 0: the resolved config as config.yaml."""
        if dist.is_main():
            self.path.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(self.resolved, sort_keys=False)
            write_atomic(self.path / "config.yaml", text.encode())  # a full disk: old or none

    def record_init_from(self, source: Path, kind: str) -> None:
        """The weights a new run starts from, resolved (a run dir becomes its checkpoint), in
        config.yaml, W&B's config and every checkpoint's config; from a Hugging Face model (or
        a run started from one), also its special token ids and chat template, which its
        export writes back (`pretrain.hf.SOURCE_DIR`)."""
        from pretrain import hf

        self.resolved["train"]["init_from"] = str(source.resolve())
        self.write_config()
        if dist.is_main():
            origin = source if kind == "hf" else source.parent.parent / hf.SOURCE_DIR
            if kind in ("hf", "checkpoint") and origin.is_dir():
                hf.keep_source_files(origin, self.path / hf.SOURCE_DIR)
