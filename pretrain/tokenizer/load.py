"""Finding and loading a tokenizer of either kind, and where one is stored in a directory.

A data dir, a run dir (the copy a run keeps) and a compressed model hold their tokenizer the
same way:

    tokenizer.model       a sentencepiece model
    tokenizer/            a Hugging Face tokenizer: tokenizer.json and its config files

(a compressed model, like any Hugging Face model dir, may also hold tokenizer.json and its
config files directly).
"""

from __future__ import annotations

from pathlib import Path

from pretrain.tokenizer.base import TextTokenizer, TokenizerError
from pretrain.tokenizer.hf import (
    HF_DIR,
    HF_FILES,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    HFText,
    read_hf_files,
)
from pretrain.tokenizer.sp import SP_FILE, SentencePieceText

KINDS = ("sentencepiece", "hf")
SLOW_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model")


def find_tokenizer(directory: str | Path) -> Path | None:
    """What `load_tokenizer` should read in `directory`, or None: its tokenizer.json (a
    Hugging Face model dir), its tokenizer/ (a data dir or run dir), its tokenizer.model (ours,
    when the directory is no Hugging Face dir)."""
    d = Path(directory)
    if (d / TOKENIZER_JSON).is_file():
        return d
    if (d / HF_DIR / TOKENIZER_JSON).is_file():
        return d / HF_DIR
    if (d / SP_FILE).is_file() and not (d / TOKENIZER_CONFIG).is_file():
        return d / SP_FILE
    return None


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer at `path`: a sentencepiece .model, a tokenizer.json (its config files are
    read from the same directory), or a directory (`find_tokenizer`): a Hugging Face model dir,
    a data dir, a run dir. Raises TokenizerError (one line) when there is none."""
    p = Path(path)
    if p.is_dir():
        found = find_tokenizer(p)
        if found is None:
            raise TokenizerError(_none_in(p))
        if found.is_dir():
            return HFText.from_files(read_hf_files(found), found)
        p = found
    if not p.is_file():
        raise TokenizerError(f"tokenizer {p} does not exist; pass the right path")
    if p.suffix == ".json":
        return HFText.from_files(read_hf_files(p.parent, tokenizer_json=p), p)
    return SentencePieceText(p)


def _none_in(d: Path) -> str:
    slow = [f for f in SLOW_FILES if (d / f).is_file()]
    if slow:
        return (
            f"{d} has no {TOKENIZER_JSON}, only {' and '.join(slow)} (a slow tokenizer's "
            f"files): write its {TOKENIZER_JSON} with transformers (`AutoTokenizer."
            f"from_pretrained('{d}').save_pretrained('{d}')`)"
            + (
                f", or pass tokenizer.path={d / SP_FILE} to use the sentencepiece model as it is"
                if (d / SP_FILE).is_file()
                else ""
            )  # fmt: skip
        )
    return (
        f"{d} holds no tokenizer: expected {TOKENIZER_JSON} (a Hugging Face model dir, with "
        f"its {TOKENIZER_CONFIG}), {HF_DIR}/{TOKENIZER_JSON} or {SP_FILE} (a data dir or run "
        f"dir); copy the model's tokenizer files into it or pass the tokenizer itself"
    )


def tokenizer_from_contents(kind: str, contents: dict[str, bytes], source: str) -> TextTokenizer:
    """A tokenizer from its files' bytes (standard name -> bytes), read from `source`."""
    if kind == "sentencepiece":
        return SentencePieceText(source, contents[SP_FILE])
    if kind == "hf":
        return HFText(contents, source)
    raise TokenizerError(f"{source}: unknown tokenizer kind {kind!r} (this code reads {KINDS})")


def remove_stored(directory: str | Path) -> None:
    """Delete a tokenizer stored in `directory` (only the names `save` writes)."""
    d = Path(directory)
    (d / SP_FILE).unlink(missing_ok=True)
    hf = d / HF_DIR
    if hf.is_dir():
        for name in HF_FILES:
            (hf / name).unlink(missing_ok=True)
        for leftover in hf.glob(".*.tmp"):
            leftover.unlink()
        if not any(hf.iterdir()):
            hf.rmdir()
