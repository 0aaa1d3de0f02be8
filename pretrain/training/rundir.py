"""The run directory's own files: the resolved config and the tokenizer copy.

`<run.dir>/config.yaml` is the resolved config (W&B gets the same dict), rewritten at every
start; `<run.dir>/tokenizer.model` is a copy of the data's tokenizer, taken at the first start,
so that a run needs no data dir to sample, and a resumed run pointed at shards made with another
tokenizer is refused instead of training on noise. Metrics and checkpoints have their own homes
(`pretrain/metrics.py`, `pretrain/checkpoint.py`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from pretrain import dist
from pretrain.config import Config, to_dict
from pretrain.data.format import Manifest
from pretrain.data.shards import is_local, local_path
from pretrain.model import GPTConfig
from pretrain.tokenizer import file_sha256


class RunDir:
    """The run directory, and the resolved config that it, W&B and every checkpoint hold."""

    def __init__(self, path: Path, resolved: dict[str, Any], tokenizer_sha256: str) -> None:
        self.path = path
        self.resolved = resolved
        self.tokenizer_sha256 = tokenizer_sha256  # what the training data's tokenizer must be

    @classmethod
    def create(cls, cfg: Config, model_cfg: GPTConfig, manifest: Manifest) -> RunDir:
        """Collective. Rank 0 writes the resolved config (with the vocabulary taken from the
        data) and, once, the tokenizer copy; every rank learns the tokenizer hash the data must
        have: the copy's, once there is one."""
        path = Path(cfg.run.dir)
        resolved = to_dict(cfg)  # type: ignore[arg-type]
        resolved["model"]["vocab_size"] = model_cfg.vocab_size
        run_tok = path / "tokenizer.model"
        expected = file_sha256(run_tok) if run_tok.is_file() else manifest.tokenizer_sha256
        dist.barrier()
        run_dir = cls(path, resolved, expected)
        run_dir.write_config()
        if dist.is_main() and not run_tok.is_file() and is_local(manifest.source):
            shutil.copyfile(local_path(manifest.source) / manifest.tokenizer, run_tok)
        dist.barrier()
        return run_dir

    def write_config(self) -> None:
        """Rank 0: the resolved config as config.yaml."""
        if dist.is_main():
            self.path.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(self.resolved, sort_keys=False)
            (self.path / "config.yaml").write_text(text)

    def record_init_from(self, source: Path) -> None:
        """The weights a new run starts from, resolved (a run dir becomes its checkpoint), in
        config.yaml, W&B's config and every checkpoint's config."""
        self.resolved["train"]["init_from"] = str(source.resolve())
        self.write_config()
