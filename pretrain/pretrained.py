"""A trained model from any form it is stored in: the one loader behind eval, sample, export
and `train.init_from`.

`load_pretrained(path)` accepts

    checkpoint   a run directory (its newest complete checkpoint), <run dir>/best or
                 <run dir>/latest, or a checkpoints/step_* directory, saved under any
                 strategy and world size
    hf           a Hugging Face directory (config.json) of a family `pretrain.hf` reads
                 (GPT-2, Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3), ours
                 (`pretrain.export --format hf`) or anyone's
    compressed   a directory written by `pretrain.compress` (compressed.json, the format of
                 `pretrain.compressed`): pruned and/or int8 weights, loaded as they are stored
                 (int8 stays int8)

and returns a `Pretrained`: our GPT with the weights loaded, its config, and its tokenizer as a
`pretrain.tokenizer.TextTokenizer` (a checkpoint's is its run's copy of the data's tokenizer,
sentencepiece or Hugging Face; an HF directory's is its tokenizer.json and config files).
A training run (`load_for_init`) gets fp32 weights from every kind: int8 ones are dequantised.
A new kind of stored model is added here, in `detect` and `load_pretrained`, and every caller
takes it.

The checks that a model fits somewhere else live here too: `check_tokenizer` (the model's
tokenizer against the one a data dir was prepared with), `check_vocab_fits` (the data's ids
against the model's embedding rows) and `architecture_mismatches` (a source's architecture
against `model.*`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from pretrain import checkpoint
from pretrain.compressed import (
    CompressedDirError,
    config_of,
    is_compressed_dir,
    load_compressed,
    read_info,
)
from pretrain.config import ConfigError
from pretrain.data.shards import DataError, Manifest, data_tokenizer
from pretrain.model import GPT, GPTConfig
from pretrain.tokenizer import (
    TextTokenizer,
    TokenizerError,
    differences,
    find_tokenizer,
    load_tokenizer,
)

Kind = Literal["checkpoint", "hf", "compressed"]
KINDS = (
    "a run directory, a checkpoint (checkpoints/step_*, <run dir>/best), a Hugging Face model "
    "directory or a compressed model directory"
)


class SourceError(ConfigError):
    """A path that holds no usable model, or a model that does not fit where it is used."""


@dataclass
class Pretrained:
    kind: Kind
    path: Path  # the resolved source: the checkpoint directory, or the HF directory
    config: GPTConfig
    model: GPT  # the weights loaded, in eval mode
    tokenizer: TextTokenizer | None  # None: an HF directory without a tokenizer
    info: dict[str, Any] | None = None  # compressed: its manifest (what was done to it)

    def describe(self) -> str:
        return f"{self.path} ({self.kind})"


def detect(path: str | Path) -> Kind:
    """Which kind of stored model `path` is; SourceError (one line) when it is none of them."""
    p = Path(path)
    if is_compressed_dir(p):
        return "compressed"
    if checkpoint.is_complete(p) or (p / "checkpoints").is_dir():
        return "checkpoint"
    from pretrain import hf

    if hf.is_hf_dir(p):
        return "hf"
    if p.name in checkpoint.POINTERS:  # <run dir>/best: checkpoint.resolve reads the pointer
        return "checkpoint"
    what = "does not exist" if not p.exists() else "holds none of them"
    raise SourceError(f"{p} {what}: pass {KINDS}")


def tokenizer_file(ckpt: Path) -> Path:
    """Where a checkpoint's tokenizer is (what `load_tokenizer` reads): the run directory's
    copy (tokenizer.model, or tokenizer/ for a Hugging Face tokenizer), else its data dir's."""
    for d in (ckpt, ckpt.parent.parent):
        if (found := find_tokenizer(d)) is not None:
            return found
    data_dir = checkpoint.data_dir_of(ckpt)
    if data_dir and (found := find_tokenizer(data_dir)) is not None:
        return found
    raise SourceError(
        f"no tokenizer next to {ckpt}, in its run directory or in its data dir "
        f"({data_dir or 'none recorded'}): copy the tokenizer the run was trained with into "
        f"{ckpt.parent.parent} (tokenizer.model, or the tokenizer/ directory of its data dir)"
    )


def _tokenizer(path: Path) -> TextTokenizer:
    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise SourceError(str(e)) from e


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """The model stored at `path` (any kind, see the module docstring), on `device`."""
    kind = detect(path)
    if kind == "compressed":
        src = Path(path)
        try:
            cfg, model, info = load_compressed(src)
        except CompressedDirError as e:
            raise SourceError(str(e)) from e
        found = find_tokenizer(src)
        tok: TextTokenizer | None = _tokenizer(found) if found is not None else None
        return Pretrained(kind, src, cfg, model.to(device).eval(), tok, info)
    if kind == "checkpoint":
        try:
            ckpt = checkpoint.resolve(path)
            cfg = GPTConfig(**checkpoint.read_config(ckpt)["model"])
            weights = checkpoint.load_model_weights(ckpt)
        except checkpoint.CheckpointError as e:
            raise SourceError(str(e)) from e
        tok = _tokenizer(tokenizer_file(ckpt))
        src = ckpt
    else:
        from pretrain import hf

        src = Path(path)
        try:
            cfg, weights = hf.load_hf(src)
        except hf.HFError as e:
            raise SourceError(str(e)) from e
        found = find_tokenizer(src)
        tok = _tokenizer(found) if found is not None else None
    model = GPT(cfg)
    model.load_state_dict(weights)
    del weights
    return Pretrained(kind, src, cfg, model.to(device).eval(), tok)


def source_config(path: str | Path) -> GPTConfig:
    """The architecture stored at `path` (any kind), read without its weights: what a run
    started from it (`train.init_from`) is built as."""
    from pretrain import hf

    kind = detect(path)
    try:
        if kind == "checkpoint":
            return GPTConfig(**checkpoint.read_config(checkpoint.resolve(path))["model"])
        if kind == "compressed":
            return config_of(read_info(path))
        return hf.read_config(path)
    except (checkpoint.CheckpointError, CompressedDirError, hf.HFError) as e:
        raise SourceError(str(e)) from e


# ---------------------------------------------------------------------------------------------
# Does it fit?
# ---------------------------------------------------------------------------------------------


def check_vocab_fits(model_rows: int, manifest: Manifest) -> None:
    """Refuse data whose token ids can reach past the model's `model_rows` embedding rows
    (its vocab_size: the padded rows are never a valid token)."""
    if manifest.vocab_size > model_rows:
        raise SourceError(
            f"{manifest.source} was prepared with a tokenizer of {manifest.vocab_size:,} ids but "
            f"the model has {model_rows:,} embedding rows: ids {model_rows:,} and above have no "
            f"embedding. Prepare the data with the model's own tokenizer, or give the model at "
            f"least {manifest.vocab_size:,} rows"
        )


def check_tokenizer(p: Pretrained, manifest: Manifest, *, allow_pipe: bool = False) -> None:
    """Refuse a data dir whose token ids mean other text than the model's tokenizer says, or
    reach past its embedding rows (a model without a tokenizer: warned, rows checked)."""
    check_source_tokenizer(
        p.path, p.tokenizer, p.config.vocab_size, manifest, allow_pipe=allow_pipe
    )


def source_tokenizer(path: str | Path) -> TextTokenizer | None:
    """The tokenizer a stored model (any kind) was trained with, read without its weights;
    None for a directory that has none."""
    kind = detect(path)
    if kind == "checkpoint":
        try:
            return _tokenizer(tokenizer_file(checkpoint.resolve(path)))
        except checkpoint.CheckpointError as e:
            raise SourceError(str(e)) from e
    found = find_tokenizer(Path(path))
    return _tokenizer(found) if found is not None else None


def check_source_tokenizer(
    source: str | Path,
    tokenizer: TextTokenizer | None,
    model_rows: int,
    manifest: Manifest,
    *,
    allow_pipe: bool = False,
    required: bool = False,
) -> None:
    """`check_tokenizer` for model `source` with `tokenizer` and `model_rows` embedding rows.
    `required`: a model without a tokenizer is refused (a run started from it must read the
    data's ids as the model did); else it is warned about."""
    if tokenizer is None:
        if required:
            raise SourceError(
                f"{source} has no tokenizer (no tokenizer.json / tokenizer.model): a run started "
                "from it cannot check that the data reads as the model was trained. Put the "
                "model's own tokenizer files next to its config.json"
            )
        check_vocab_fits(model_rows, manifest)
        warnings.warn(
            f"{source} has no tokenizer: cannot check that {manifest.source} was tokenized the "
            "way the model was trained",
            stacklevel=3,
        )
        return
    if tokenizer.sha256 != manifest.tokenizer_sha256:
        try:
            why = differences(tokenizer, data_tokenizer(manifest, allow_pipe=allow_pipe))
        except DataError as e:
            raise SourceError(str(e)) from e
        if why is not None:
            data = manifest.describe_tokenizer()
            raise SourceError(
                f"the model {source} was trained with another tokenizer than the one "
                f"{manifest.source} was prepared with ({why}): the model's is "
                f"{tokenizer.describe()}, the data's is "
                f"{data}. Prepare the data with the model's tokenizer: python -m pretrain.prepare "
                f"input=<your corpus> output=<new dir> tokenizer.path={tokenizer.path}"
            )
    check_vocab_fits(model_rows, manifest)


# Architecture fields, with the resolved value to compare (0 in n_kv_head / mlp_hidden means a
# derived default, so the derived sizes are what must agree). dropout, init_std and
# pad_vocab_to are not architecture: a fine-tuning run may change them.
ARCHITECTURE: dict[str, Any] = {
    "vocab_size": lambda c: c.vocab_size,
    "block_size": lambda c: c.block_size,
    "n_layer": lambda c: c.n_layer,
    "n_head": lambda c: c.n_head,
    "n_kv_head": lambda c: c.kv_heads,
    "n_embd": lambda c: c.n_embd,
    "mlp_hidden": lambda c: c.mlp_hidden_size,
    "bias": lambda c: c.bias,
    "norm": lambda c: c.norm,
    "mlp": lambda c: c.mlp,
    "pos_emb": lambda c: c.pos_emb,
    "rope_theta": lambda c: c.rope_theta if c.pos_emb == "rope" else None,
    "tie_embeddings": lambda c: c.tie_embeddings,
    "norm_eps": lambda c: c.norm_eps,
    "head_size": lambda c: c.head_dim,
    "layer_heads": lambda c: [c.heads_of(i) for i in range(c.n_layer)],
    "layer_mlp_hidden": lambda c: [c.mlp_hidden_of(i) for i in range(c.n_layer)],
    "qkv_bias": lambda c: c.qkv_bias,
    "qk_norm": lambda c: c.qk_norm,
    "rope_scaling": lambda c: c.rope_scaling if c.pos_emb == "rope" else None,
    "rope_factor": lambda c: _llama3(c, c.rope_factor),
    "rope_low_freq_factor": lambda c: _llama3(c, c.rope_low_freq_factor),
    "rope_high_freq_factor": lambda c: _llama3(c, c.rope_high_freq_factor),
    "rope_original_max_len": lambda c: _llama3(c, c.rope_original_max_len),
    "sliding_window": lambda c: c.sliding_window,
    # Not the computation but the class the run's exports are written as: the source's.
    "hf_model_type": lambda c: _export_type(c),
}


# 0 / empty = a rule over the other fields; the llama3 numbers and the export type follow
# from rope_scaling and the options, so they are named only when those agree.
DERIVED = (
    "n_kv_head", "mlp_hidden", "head_size", "layer_heads", "layer_mlp_hidden", "rope_factor",
    "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len", "hf_model_type",
)  # fmt: skip


def _llama3(cfg: GPTConfig, value: float) -> float | None:
    """A llama3 rope_scaling number of `cfg`, None where that rule is not on."""
    return value if cfg.rope_scaling == "llama3" else None


def _export_type(cfg: GPTConfig) -> str | None:
    """The transformers model type an HF export of `cfg` writes (None: no stock class fits)."""
    from pretrain.hf import HFError, family

    try:
        return family(cfg)
    except HFError:
        return cfg.hf_model_type or None


def architecture_mismatches(source: GPTConfig, target: GPTConfig) -> list[tuple[str, Any, Any]]:
    """(key, target value, source value) for every architecture field that differs. A derived
    size (n_kv_head, mlp_hidden, head_size, the per-layer sizes) is named only if it still differs once the other keys agree:
    n_embd=32 vs 64 says it all, the MLP width that follows from it is not a second problem."""

    def diff(a: GPTConfig, b: GPTConfig) -> list[tuple[str, Any, Any]]:
        return [(k, get(b), get(a)) for k, get in ARCHITECTURE.items() if get(a) != get(b)]

    primary = [d for d in diff(source, target) if d[0] not in DERIVED]
    fixed = replace(target, **{k: s for k, _, s in primary if s is not None})
    derived = [d for d in diff(source, fixed) if d[0] in DERIVED]
    return [d for d in diff(source, target) if d in primary or d[0] in {x[0] for x in derived}]


def weights_for(p: Pretrained, target: GPTConfig) -> dict[str, torch.Tensor]:
    """The source's state dict shaped for a model built from `target` (same architecture; the
    vocabulary padding may differ, and padded rows never change an output), in fp32: int8
    weights are dequantised. The real rows are the source's vocab_size (an HF source's config
    rows, which may exceed its tokenizer's ids): `target` must have them all."""
    from pretrain.hf import pad_vocab
    from pretrain.quantize import dequantized

    if target.vocab_size != p.config.vocab_size:
        raise SourceError(
            f"model.vocab_size={target.vocab_size} but {p.path} has {p.config.vocab_size} "
            f"embedding rows: set model.vocab_size={p.config.vocab_size} (every row takes part "
            "in the softmax, used by the tokenizer or not)"
        )
    sd = dequantized(p.model.state_dict())
    rows = target.padded_vocab_size
    sd["transformer.wte.weight"] = pad_vocab(sd["transformer.wte.weight"], rows)
    if target.tie_embeddings:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    else:
        sd["lm_head.weight"] = pad_vocab(sd["lm_head.weight"], rows)
    return sd


def load_for_init(
    source: str, target: GPTConfig, manifest: Manifest, *, allow_pipe: bool = False
) -> tuple[Pretrained, dict[str, torch.Tensor]]:
    """`train.init_from`: the source and its weights for `target`, after checking that it reads
    the data's tokens and that its architecture is `model.*` (named key by key when not)."""
    p = load_pretrained(source)
    # The tokenizer first: another tokenizer also means another vocabulary size, and that is
    # its cause, not a model.vocab_size to change.
    check_source_tokenizer(
        p.path, p.tokenizer, p.config.vocab_size, manifest, allow_pipe=allow_pipe, required=True
    )
    refuse_mismatches(source, architecture_mismatches(p.config, target))
    return p, weights_for(p, target)


def refuse_mismatches(source: str, bad: list[tuple[str, Any, Any]]) -> None:
    """SourceError naming each `model.*` key that contradicts the source (key, ours, its),
    with the overrides that would agree; nothing when `bad` is empty."""
    if bad:
        raise SourceError(
            f"train.init_from={source}: model.* disagrees with the source's architecture: "
            + "; ".join(f"model.{k}={t} but the source has {s}" for k, t, s in bad)
            + ". Set them to the source's values ("
            + " ".join(f"model.{k}={_override(s)}" for k, _, s in bad)
            + ") or leave them out: a run started from weights is built as its source"
        )


def _override(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)
