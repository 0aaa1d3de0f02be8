"""`python -m pretrain.export <checkpoint or run dir> <out> [--format hf] [--dtype bf16]`.

Consolidated model weights from any checkpoint (saved under any strategy and world size: the
DCP checkpoint is keyed by parameter name and resharded on read), in one of two formats:

    hf            a directory that stock transformers loads offline (AutoModelForCausalLM,
                  AutoTokenizer, a generation config) as the class the model has
                  (`pretrain.hf.FAMILIES`: GPT-2, Llama, Mistral, Qwen2, Qwen3; an HF source's
                  own, recorded in model.hf_model_type), sharded with an index above
                  --max-shard-size, with the run's tokenizer. The mapping is pretrain/hf.py.
                  Also from a pruned model of `pretrain.compress` (a compressed directory).
    safetensors   one .safetensors file with our own parameter names (an out path ending in
                  .safetensors picks it), described below.

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
from pretrain.compressed import config_of, is_compressed_dir, load_compressed, read_info
from pretrain.engine.precision import DTYPES
from pretrain.model import GPTConfig

FORMATS = ("auto", "hf", "safetensors")


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


def export_hf(
    src: str | Path, out: str | Path, dtype: str = "fp32", max_shard_size: str = "5GB"
) -> Path:
    """Write checkpoint (or run dir) `src` as a Hugging Face model directory `out`."""
    from pretrain import hf
    from pretrain.pretrained import tokenizer_file
    from pretrain.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if is_compressed_dir(src):
        return _export_compressed_hf(Path(src), out, dtype, max_shard_size)
    ckpt = resolve(src)
    cfg = GPTConfig(**read_config(ckpt)["model"])
    hf.family(cfg)  # refuse a model no stock class fits before reading any weight
    tokenizer = load_tokenizer(tokenizer_file(ckpt))  # the run's, sentencepiece or HF
    source = ckpt.parent.parent / hf.SOURCE_DIR  # the HF model the run started from, if any
    return hf.save_hf(
        cfg,
        load_model_weights(ckpt),
        out,
        tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
        consume=True,  # the weights are ours alone: convert them without a second copy
        source=source if source.is_dir() else None,
    )


def _export_compressed_hf(src: Path, out: str | Path, dtype: str, max_shard_size: str) -> Path:
    """A pruned model of `pretrain.compress` as a Hugging Face directory (same architecture
    rules; int8 weights have no stock transformers class and stay in our format)."""
    from pretrain import hf
    from pretrain.quantize import model_is_quantized
    from pretrain.tokenizer import find_tokenizer, load_tokenizer

    cfg = config_of(read_info(src))
    hf.family(cfg)
    found = find_tokenizer(src)
    if found is None:
        raise ValueError(f"{src} has no tokenizer: an HF export writes the model's tokenizer")
    _, model, _ = load_compressed(src)
    if model_is_quantized(model):
        raise ValueError(
            f"{src} is quantised to int8, which no stock transformers class loads: export the "
            "model before quantising (pretrain.compress without --quantize) and quantise there"
        )
    return hf.save_hf(
        cfg, model.state_dict(), out, load_tokenizer(found), dtype=dtype,
        max_shard_size=max_shard_size,
    )  # fmt: skip


# What an HF export writes: with --overwrite, these are removed from the target first, so that
# nothing of an earlier export (a shard index, shards of another size) is left stale beside it.
HF_OUTPUTS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def _make_room(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse a target that holds something (unless `overwrite`: then clear what an export
    writes)."""
    if fmt == "safetensors":
        if out.exists() and not overwrite:
            raise ValueError(f"{out} exists: pass --overwrite to replace it, or another path")
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: an HF export writes a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{out} is not empty: pass --overwrite to replace an earlier export there (its "
                "weights, config and tokenizer files are removed first), or give an empty or "
                "new directory"
            )
        for pattern in HF_OUTPUTS:
            for f in out.glob(pattern):
                f.unlink()


def export(
    src: str | Path,
    out: str | Path,
    fmt: str = "auto",
    dtype: str = "fp32",
    overwrite: bool = False,
    **hf_kw: str,
) -> Path:
    """`export_hf` or `export_safetensors`; fmt=auto picks safetensors for a .safetensors out.
    A target that holds something is refused unless `overwrite`."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
    is_file = str(out).endswith(".safetensors")
    if fmt == "auto":
        fmt = "safetensors" if is_file else "hf"
    if fmt == "hf" and is_file:
        raise ValueError(
            f"--format hf writes a directory, but {out} names a .safetensors file: give a "
            "directory, or drop --format hf for our own single-file format"
        )
    if not is_compressed_dir(src):
        resolve(src)  # a missing or incomplete source is named before anything is touched
    _make_room(Path(out), fmt, overwrite)
    if fmt == "safetensors":
        return export_safetensors(src, out, dtype)
    return export_hf(src, out, dtype, **hf_kw)


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
        description="Export consolidated weights of a checkpoint (any strategy) to a Hugging "
        "Face directory or one safetensors file.",
    )
    ap.add_argument(
        "src",
        help="a run directory, <run dir>/best, a checkpoints/step_* directory, or (hf) a "
        "compressed model",
    )
    ap.add_argument("out", help="output directory (hf), or a .safetensors file (our format)")
    ap.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="hf: a transformers model directory; safetensors: our names in one file; "
        "auto (default): safetensors when out ends in .safetensors, else hf",
    )
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in out (otherwise a non-empty target is refused)",
    )
    ap.add_argument(
        "--max-shard-size",
        default="5GB",
        help="hf: largest weight file; bigger models are split, with an index (default 5GB)",
    )
    args = ap.parse_args(argv)
    try:
        path = export(
            args.src, args.out, args.format, args.dtype, args.overwrite,
            max_shard_size=args.max_shard_size,
        )  # fmt: skip
    except (CheckpointError, OSError, ValueError) as e:  # HFError, SourceError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
