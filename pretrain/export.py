"""`python -m pretrain.export <checkpoint or run dir> <out.safetensors> [--dtype bf16]`.

Consolidated model weights from any checkpoint (saved under any strategy and world size: the
DCP checkpoint is keyed by parameter name and resharded on read) as one safetensors file.

Tied weights (GPT-2's token embedding = output projection) are stored once, under the first
name; the file's metadata lists the aliases (`tied`: {"lm_head.weight":
"transformer.wte.weight"}) and the model config (`model`: JSON), and `load_safetensors`
restores every name, so `GPT(config).load_state_dict(load_safetensors(path))` is strict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pretrain.checkpoint import CheckpointError, load_model_weights, read_config, resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_safetensors(src: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the consolidated weights of checkpoint (or run dir) `src` to `out`; returns it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    ckpt = resolve(src)
    weights = load_model_weights(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, t in weights.items():
        key = t.untyped_storage().data_ptr()
        if key in first_name:
            tied[name] = first_name[key]  # an alias of a tensor already stored
            continue
        first_name[key] = name
        tensors[name] = t.detach().to(DTYPES[dtype]).contiguous()
    metadata = {
        "format": "pt",
        "tied": json.dumps(tied),
        "model": json.dumps(read_config(ckpt)["model"]),
        "source": str(ckpt),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict written by `export_safetensors`, tied names restored (as aliases)."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for alias, name in json.loads(meta.get("tied", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Export consolidated weights of a checkpoint (any strategy) to safetensors.",
    )
    ap.add_argument(
        "src", help="a run directory, <run dir>/best, or a checkpoints/step_* directory"
    )
    ap.add_argument("out", help="output .safetensors file")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    try:
        path = export_safetensors(args.src, args.out, args.dtype)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
