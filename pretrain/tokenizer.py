"""Tokenizer: train a sentencepiece BPE model, load it, and hash it.

The tokenizer is byte-level lossless for UTF-8 text: normalisation is the identity, whitespace is
kept as is (indentation matters in code), no dummy prefix is added and unknown characters fall
back to their UTF-8 bytes (`<0x..>` pieces). So `decode(encode(text)) == text` for any text that
does not itself contain sentencepiece's space marker U+2581 ("▁"), which decodes as a space.

Special ids are fixed so that every prepared dataset agrees on them:
UNK=0, BOS=1, EOS=2, PAD=3. Prepare appends EOS after each document; BOS is not used by default.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class TokenizerTrainingError(ValueError):
    """Raised with a message that says what to change when sentencepiece refuses to train."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one:
    temp file in the same directory, fsync, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_tokenizer(
    docs: Iterable[str],
    vocab_size: int,
    out_path: str | Path,
    *,
    num_threads: int = 1,
    max_sentence_bytes: int = 4096,
) -> Path:
    """Train a byte-fallback BPE model on `docs` and write it atomically to `out_path`.

    `docs` should already be a bounded, deterministic sample: the model is a pure function of the
    sequence of strings (no sampling or shuffling inside sentencepiece). Each string is one
    training "sentence"; strings longer than `max_sentence_bytes` UTF-8 bytes are ignored by
    sentencepiece, so callers should cut documents into pieces (prepare cuts at line ends).
    """
    out_path = Path(out_path)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs),
            model_writer=writer,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            # Identity normalisation + kept whitespace: the ids decode back to the exact text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            # The caller bounds and orders the sample; sentencepiece must not resample it.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=max_sentence_bytes,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise _rephrase(exc, vocab_size) from exc
    write_atomic(out_path, writer.getvalue())
    return out_path


def _rephrase(exc: RuntimeError, vocab_size: int) -> Exception:
    msg = str(exc)
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
        return TokenizerTrainingError(
            f"tokenizer.vocab_size={vocab_size} is too large for this corpus: its training sample "
            f"supports at most ~{m.group(1)} pieces. Use a smaller tokenizer.vocab_size, more "
            f"text, or a larger tokenizer.sample_bytes."
        )
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return TokenizerTrainingError(
            f"tokenizer.vocab_size={vocab_size} is too small for this corpus: it needs at least "
            f"{m.group(2)} (the 256 byte pieces, special ids and every frequent character) plus "
            f"room for merges; use e.g. tokenizer.vocab_size={max(512, 2 * int(m.group(2)))}."
        )
    if "not found" in msg.lower() or "no sentence" in msg.lower() or "empty" in msg.lower():
        return TokenizerTrainingError(
            f"sentencepiece found no usable training text ({msg}); check the input files."
        )
    return TokenizerTrainingError(f"sentencepiece could not train the tokenizer: {msg}")


class Tokenizer:
    """A trained sentencepiece model with the project's special ids and a content hash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {self.path} does not exist; run `python -m pretrain.prepare` "
                f"(it writes tokenizer.model next to the shards) or pass the right path."
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.sha256 = file_sha256(self.path)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def pad_id(self) -> int:
        return int(self.sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self.sp.unk_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Text of `ids` (a list, numpy array or 1-D tensor); special ids decode to nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return str(self.sp.decode([int(i) for i in ids]))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
