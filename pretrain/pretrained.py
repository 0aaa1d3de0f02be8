"""A trained model from any form it is stored in: the one loader behind eval, sample, export
and `train.init_from`.

`load_pretrained(path)` accepts

    checkpoint   a run directory (its newest complete checkpoint), <run dir>/best or
                 <run dir>/latest, or a checkpoints/step_* directory, saved under any
                 strategy and world size
    hf           a Hugging Face directory (config.json) of a GPT2LMHeadModel or a
                 LlamaForCausalLM, ours (`pretrain.export --format hf`) or anyone's
    compressed   a directory written by `pretrain.compress` (compressed.json, the format of
                 `pretrain.compressed`): pruned and/or int8 weights, loaded as they are stored
                 (int8 stays int8)

and returns a `Pretrained`: our GPT with the weights loaded, its config, and its tokenizer
behind one small interface (sentencepiece for checkpoints, tokenizer.json for HF directories).
A training run (`load_for_init`) gets fp32 weights from every kind: int8 ones are dequantised.
A new kind of stored model is added here, in `detect` and `load_pretrained`, and every caller
takes it.

The checks that a model fits somewhere else live here too: `check_tokenizer` (the model's
tokenizer against the one a data dir was prepared with) and `architecture_mismatches` (a
source's architecture against `model.*`).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from pretrain import checkpoint
from pretrain.compressed import CompressedDirError, is_compressed_dir, load_compressed
from pretrain.config import ConfigError
from pretrain.data.shards import Manifest, fetch, resolve
from pretrain.model import GPT, GPTConfig
from pretrain.tokenizer import Tokenizer

Kind = Literal["checkpoint", "hf", "compressed"]
KINDS = (
    "a run directory, a checkpoint (checkpoints/step_*, <run dir>/best), a Hugging Face model "
    "directory or a compressed model directory"
)


class SourceError(ConfigError):
    """A path that holds no usable model, or a model that does not fit where it is used."""


class TextTokenizer(ABC):
    """What callers need of a model's tokenizer, whatever it is stored as."""

    eos_id: int
    bos_id: int  # -1: none
    sha256: str | None = None  # of the sentencepiece model file, when there is one

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, nothing added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids decode to nothing."""

    @abstractmethod
    def pieces(self) -> list[str]:
        """The vocabulary, by id."""


class SentencePieceText(TextTokenizer):
    def __init__(self, path: Path) -> None:
        self.tok = Tokenizer(path)
        self.eos_id, self.bos_id, self.sha256 = self.tok.eos_id, self.tok.bos_id, self.tok.sha256

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    def pieces(self) -> list[str]:
        return [self.tok.sp.id_to_piece(i) for i in range(self.tok.vocab_size)]


class HFText(TextTokenizer):
    """A transformers tokenizer (tokenizer.json). No BOS or EOS is added to encoded text."""

    def __init__(self, path: Path) -> None:
        from pretrain.hf import quiet_import

        quiet_import()
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.eos_id = int(self.tok.eos_token_id)
        self.bos_id = int(self.tok.bos_token_id if self.tok.bos_token_id is not None else -1)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    def pieces(self) -> list[str]:
        return list(self.tok.convert_ids_to_tokens(list(range(len(self.tok)))))


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
    """The sentencepiece model of a checkpoint: the run directory's copy, else its data dir's."""
    for cand in (ckpt / "tokenizer.model", ckpt.parent.parent / "tokenizer.model"):
        if cand.is_file():
            return cand
    data_dir = (checkpoint.read_config(ckpt).get("data") or {}).get("dir")
    if data_dir and (Path(data_dir) / "tokenizer.model").is_file():
        return Path(data_dir) / "tokenizer.model"
    raise SourceError(
        f"no tokenizer.model next to {ckpt}, in its run directory or in its data dir "
        f"({data_dir or 'none recorded'}): copy the tokenizer the run was trained with to "
        f"{ckpt.parent.parent / 'tokenizer.model'}"
    )


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """The model stored at `path` (any kind, see the module docstring), on `device`."""
    kind = detect(path)
    if kind == "compressed":
        src = Path(path)
        try:
            cfg, model, info = load_compressed(src)
        except CompressedDirError as e:
            raise SourceError(str(e)) from e
        if (src / "tokenizer.model").is_file():
            tok: TextTokenizer | None = SentencePieceText(src / "tokenizer.model")
        else:
            tok = HFText(src) if (src / "tokenizer.json").is_file() else None
        return Pretrained(kind, src, cfg, model.to(device).eval(), tok, info)
    if kind == "checkpoint":
        try:
            ckpt = checkpoint.resolve(path)
            cfg = GPTConfig(**checkpoint.read_config(ckpt)["model"])
            weights = checkpoint.load_model_weights(ckpt)
        except checkpoint.CheckpointError as e:
            raise SourceError(str(e)) from e
        tok = SentencePieceText(tokenizer_file(ckpt))
        src = ckpt
    else:
        from pretrain import hf

        src = Path(path)
        try:
            cfg, weights = hf.load_hf(src)
        except hf.HFError as e:
            raise SourceError(str(e)) from e
        has_tok = (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file()
        tok = HFText(src) if has_tok else None
    model = GPT(cfg)
    model.load_state_dict(weights)
    del weights
    return Pretrained(kind, src, cfg, model.to(device).eval(), tok)


# ---------------------------------------------------------------------------------------------
# Does it fit?
# ---------------------------------------------------------------------------------------------


def data_pieces(manifest: Manifest, *, allow_pipe: bool = False) -> list[str]:
    """The pieces of the sentencepiece model a data dir was prepared with."""
    import sentencepiece as spm

    proto = fetch(resolve(manifest.source, manifest.tokenizer, allow_pipe=allow_pipe))
    sp = spm.SentencePieceProcessor(model_proto=proto)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def check_tokenizer(p: Pretrained, manifest: Manifest, *, allow_pipe: bool = False) -> None:
    """Refuse a data dir whose token ids mean other text than the model's tokenizer says."""
    fix = (
        "use a data dir prepared with the model's tokenizer (`python -m pretrain.prepare "
        "input=<your corpus> output=<new dir> tokenizer.path=<the model's tokenizer.model>`)"
    )
    if p.tokenizer is None:
        if p.config.vocab_size < manifest.vocab_size:
            raise SourceError(
                f"{p.path} has {p.config.vocab_size} token ids but {manifest.source} uses "
                f"{manifest.vocab_size}: they were not made with the same tokenizer; {fix}"
            )
        warnings.warn(
            f"{p.path} has no tokenizer: cannot check that {manifest.source} was tokenized the "
            "way the model was trained",
            stacklevel=2,
        )
        return
    if p.tokenizer.sha256 is not None:
        if p.tokenizer.sha256 == manifest.tokenizer_sha256:
            return
        differs = f"sha256 {p.tokenizer.sha256[:12]} vs {manifest.tokenizer_sha256[:12]}"
    else:
        ours, theirs = p.tokenizer.pieces(), data_pieces(manifest, allow_pipe=allow_pipe)
        if ours == theirs:
            return
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        differs = f"{len(ours)} vs {len(theirs)} pieces" + (
            f", id {first} is {ours[first]!r} vs {theirs[first]!r}" if first is not None else ""
        )
    raise SourceError(
        f"the model {p.path} was trained with another tokenizer than the one {manifest.source} "
        f"was prepared with ({differs}): {fix}"
    )


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
}


# 0 / empty = a rule over the other fields
DERIVED = ("n_kv_head", "mlp_hidden", "head_size", "layer_heads", "layer_mlp_hidden")


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
    weights are dequantised."""
    from pretrain.hf import pad_vocab
    from pretrain.quantize import dequantized

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
    check_tokenizer(p, manifest, allow_pipe=allow_pipe)
    bad = architecture_mismatches(p.config, target)
    if bad:
        raise SourceError(
            f"train.init_from={source}: model.* disagrees with the source's architecture: "
            + "; ".join(f"model.{k}={t} but the source has {s}" for k, t, s in bad)
            + ". Set them to the source's values ("
            + " ".join(f"model.{k}={_override(s)}" for k, _, s in bad)
            + ") or pick the model preset it was trained with"
        )
    return p, weights_for(p, target)


def _override(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)
