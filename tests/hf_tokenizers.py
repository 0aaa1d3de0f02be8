"""Hugging Face tokenizers in the shapes open models ship them, built here without a download.

    from tests.hf_tokenizers import KINDS, SPECS, build
    build("llama3", tmp_path / "llama3")              # -> the directory, ready for
    build("llama3", tmp_path / "big", big=True)       #    tokenizer.path= or an HF model dir

Each is trained with the `tokenizers` library on a few standard-library files (a second or
two) and written the way transformers' `save_pretrained` writes it (tokenizer.json and
tokenizer_config.json, by `PreTrainedTokenizerFast.save_pretrained` itself), plus the files the
real repositories carry:

    gpt2     byte-level BPE, a ByteLevel post-processor (adds nothing), `<|endoftext|>`. As in
             the openai-community/gpt2 repository, tokenizer_config.json names no token
             ({"model_max_length": 1024}): the EOS is generation_config.json's eos_token_id.
    llama3   byte-level BPE (Llama 3's split regex), `<|begin_of_text|>` / `<|end_of_text|>`
             and reserved special tokens after the BPE vocabulary; its post-processor
             (ByteLevel, then TemplateProcessing) adds the BOS.
    qwen     byte-level BPE with an NFC normaliser, no post-processor: no BOS. EOS and pad are
             `<|endoftext|>`; `<|im_start|>` / `<|im_end|>` are special, `<tool_call>` an added
             token that is not special.
    llama2   sentencepiece-derived BPE as Llama 2 and Mistral ship it: `Prepend("▁")` +
             `Replace(" ", "▁")` normaliser, no pre-tokenizer, byte fallback (`<0x00>`..),
             `<unk>`/`<s>`/`</s>` = 0/1/2, a post-processor that adds `<s>`; tokenizer_config.json
             sets add_bos_token / add_eos_token, and special_tokens_map.json is there too.
    unigram  a Unigram model with a Metaspace pre-tokenizer, `<pad>`/`</s>`/`<unk>` = 0/1/2,
             and a T5-style post-processor that appends `</s>` (the EOS) to every text.

`big=True` pads the model's vocabulary with unused entries to over 65,536 ids (BIG_VOCAB) and
puts the special tokens after them, so BOS/EOS ids exceed 65,535 as Llama 3's (128000, 128001)
do: data of such a tokenizer needs 32-bit ids. `SPECS[kind]` says what was built (the EOS and
BOS token strings, whether the post-processor adds the BOS), for tests to check against.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.data_fixtures import stdlib_subset

KINDS = ("gpt2", "llama3", "qwen", "llama2", "unigram")
VOCAB = 1000  # trained entries (before specials and padding)
BIG_VOCAB = 70_000  # model vocabulary with big=True: past uint16
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Spec:
    eos: str  # the EOS token's text
    bos: str | None  # the BOS token's text, None = the tokenizer has none
    adds_bos: bool  # its post-processor puts the BOS before encoded text
    appends_eos: bool = False  # its post-processor puts the EOS after encoded text


SPECS = {
    "gpt2": Spec(eos="<|endoftext|>", bos=None, adds_bos=False),
    "llama3": Spec(eos="<|end_of_text|>", bos="<|begin_of_text|>", adds_bos=True),
    "qwen": Spec(eos="<|endoftext|>", bos=None, adds_bos=False),
    "llama2": Spec(eos="</s>", bos="<s>", adds_bos=True),
    "unigram": Spec(eos="</s>", bos=None, adds_bos=False, appends_eos=True),
}


def corpus(n_files: int = 40) -> list[str]:
    """The training text: `n_files` standard-library files (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / rel).read_text(encoding="utf-8") for rel in stdlib_subset(n_files)]


def build(kind: str, dest: Path, *, big: bool = False, vocab: int = VOCAB) -> Path:
    """Write tokenizer `kind` (see the module docstring) into `dest` (created); returns it."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    raw, specials, config = _BUILDERS[kind](corpus(), vocab, big)
    dest.mkdir(parents=True, exist_ok=True)
    _save_pretrained(raw, dest, config)
    if kind == "gpt2":  # the repository's own files: no token in tokenizer_config.json
        (dest / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
        eos = specials["<|endoftext|>"]
        (dest / "generation_config.json").write_text(
            json.dumps({"bos_token_id": eos, "eos_token_id": eos}, indent=2)
        )
    if kind == "llama2":
        special_map = {
            "bos_token": {"content": "<s>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False},
            "eos_token": {"content": "</s>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False},
            "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False},
        }  # fmt: skip
        (dest / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return dest


def _save_pretrained(raw: Any, dest: Path, config: dict[str, Any]) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=raw, **config).save_pretrained(dest)


def _pad_vocab(raw: Any, size: int) -> Any:
    """`raw` with unused entries appended to its model's vocabulary up to `size` ids (no merge
    makes them, so encoding is unchanged)."""
    from tokenizers import Tokenizer

    spec = json.loads(raw.to_str())
    vocab = spec["model"]["vocab"]
    assert isinstance(vocab, dict) and not spec["added_tokens"]
    for i in range(len(vocab), size):
        vocab[f"<unused_{i}>"] = i
    return Tokenizer.from_str(json.dumps(spec))


def _byte_level(texts: list[str], vocab: int, split: str | None) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    raw.pre_tokenizer = (
        byte_level
        if split is None
        else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    return raw


def _ids(raw: Any, tokens: list[str]) -> dict[str, int]:
    return {t: raw.token_to_id(t) for t in tokens}


def _gpt2(texts: list[str], vocab: int, big: bool) -> tuple[Any, dict[str, int], dict]:
    from tokenizers import AddedToken, processors

    raw = _byte_level(texts, vocab, None)
    raw = _pad_vocab(raw, BIG_VOCAB) if big else raw
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    raw.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return raw, _ids(raw, ["<|endoftext|>"]), {"eos_token": "<|endoftext|>"}


def _llama3(texts: list[str], vocab: int, big: bool) -> tuple[Any, dict[str, int], dict]:
    from tokenizers import AddedToken, processors

    raw = _byte_level(texts, vocab, LLAMA3_SPLIT)
    raw = _pad_vocab(raw, BIG_VOCAB) if big else raw
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(6)]
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    bos = raw.token_to_id("<|begin_of_text|>")
    raw.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    return raw, _ids(raw, names[:2]), config


def _qwen(texts: list[str], vocab: int, big: bool) -> tuple[Any, dict[str, int], dict]:
    from tokenizers import AddedToken, normalizers

    raw = _byte_level(texts, vocab, LLAMA3_SPLIT)
    raw = _pad_vocab(raw, BIG_VOCAB) if big else raw
    raw.normalizer = normalizers.NFC()
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    raw.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None}
    return raw, _ids(raw, names), config


def _llama2(texts: list[str], vocab: int, big: bool) -> tuple[Any, dict[str, int], dict]:
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    # Train on Metaspace words, then lay the vocabulary out as sentencepiece does: the specials,
    # the 256 byte pieces, the learned pieces.
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])]
    ids: dict[str, int] = {}
    for p in pieces:
        ids.setdefault(p, len(ids))
    if big:
        ids |= {f"<unused_{i}>": i for i in range(len(ids), BIG_VOCAB)}
    raw = Tokenizer(
        models.BPE(
            vocab=ids,
            merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                    for m in learned["merges"]],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )  # fmt: skip
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    raw.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", ids["<s>"])]
    )
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    return raw, _ids(raw, ["<unk>", "<s>", "</s>"]), config


def _unigram(texts: list[str], vocab: int, big: bool) -> tuple[Any, dict[str, int], dict]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    learner = Tokenizer(models.Unigram())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    learner.train_from_iterator(
        texts,
        trainers.UnigramTrainer(
            vocab_size=vocab,
            special_tokens=["<pad>", "</s>", "<unk>"],
            unk_token="<unk>",
            show_progress=False,
        ),
    )
    spec = json.loads(learner.to_str())
    if big:  # unused pieces of a very low score: never chosen
        model = spec["model"]["vocab"]
        model += [[f"<unused_{i}>", -1e9] for i in range(len(model), BIG_VOCAB)]
    raw = Tokenizer.from_str(json.dumps(spec))
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    raw.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", 1)]
    )
    config = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return raw, _ids(raw, ["<pad>", "</s>", "<unk>"]), config


_BUILDERS = {"gpt2": _gpt2, "llama3": _llama3, "qwen": _qwen, "llama2": _llama2,
             "unigram": _unigram}  # fmt: skip
