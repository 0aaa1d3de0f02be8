"""The compressed model directory, defined once: written by `pretrain.compress`, read by
`pretrain.pretrained` (and so by eval, sample and `train.init_from`) and by `pretrain.export`.

    compressed.json     the manifest (`MANIFEST`): `format` (`FORMAT`), `weights` (the weight
                        file's name), `model` (the architecture: `GPTConfig`'s fields, the
                        pruned sizes included) and what was done (`source`, `data`, `prune`,
                        `finetune`, `quantize`; `before`, for a compressed source). Written
                        last: it marks the directory as complete, and is what
                        `is_compressed_dir` detects.
    model.safetensors   the weights (`WEIGHTS`), in `pretrain.quantize`'s file format: int8
                        tensors flattened by torchao, a tied weight stored once
    tokenizer.model     the model's tokenizer (tokenizer.json and its config files instead, for
                        a model from a Hugging Face directory)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pretrain.config import ConfigError
from pretrain.model import GPT, GPTConfig
from pretrain.quantize import load_into, load_weights, save_weights

FORMAT = "pretrain-compressed/1"
MANIFEST = "compressed.json"
WEIGHTS = "model.safetensors"


class CompressedDirError(ConfigError):
    """A compressed model directory this version cannot read: another format, or weights that
    do not load."""


def is_compressed_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_info(path: str | Path) -> dict[str, Any]:
    """The manifest of the compressed model directory `path`."""
    info = json.loads((Path(path) / MANIFEST).read_text())
    if info.get("format") != FORMAT:
        raise CompressedDirError(
            f"{path}/{MANIFEST} is format {info.get('format')!r}; this version reads {FORMAT}"
        )
    return info


def config_of(info: dict[str, Any]) -> GPTConfig:
    """The architecture a manifest records."""
    return GPTConfig(**info["model"])


def load_compressed(path: str | Path) -> tuple[GPTConfig, GPT, dict[str, Any]]:
    """The architecture, the model (weights loaded, quantised ones as int8) and the manifest
    of a compressed model directory."""
    path = Path(path)
    info = read_info(path)
    cfg = config_of(info)
    with torch.device("meta"):
        model = GPT(cfg)
    try:
        load_into(model, load_weights(path / info.get("weights", WEIGHTS)))
    except (OSError, RuntimeError, ValueError) as e:
        raise CompressedDirError(
            f"{path}: the weights do not load ({type(e).__name__}: {e})"
        ) from e
    return cfg, model.eval(), info


def write_compressed(
    out: Path, model: GPT, info: dict[str, Any], tokenizer_from: list[Path]
) -> Path:
    """Write `model` and its manifest `info` to `out` (the manifest last: it marks the
    directory as complete)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    save_weights(model.state_dict(), out / WEIGHTS, {"format": FORMAT})
    for f in tokenizer_from:
        if f.resolve() != (out / f.name).resolve():
            shutil.copyfile(f, out / f.name)
    model_cfg = asdict(model.cfg)
    full = {"format": FORMAT, "weights": WEIGHTS, "model": model_cfg, **info}
    (out / MANIFEST).write_text(json.dumps(full, indent=1) + "\n")
    return out
