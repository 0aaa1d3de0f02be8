"""Tokenizing prepare's documents, in worker processes (or inline when num_proc == 1).

A document's tokens are what `TextTokenizer.encode_documents` makes of it with the data dir's
tokenizer: `encode(prompt) + encode(text) + [EOS]` for sentencepiece (`prompt` is "" for plain
documents, so theirs are `encode(text) + [EOS]`); a Hugging Face tokenizer puts its BOS first
when its post-processor adds one. Prompt and response are encoded apart, so no token spans the
boundary and the loss mask is exact: 0 for the BOS and the prompt's tokens, 1 for the
response's and what follows it.

Documents are encoded in batches (a unit's documents, up to BATCH_CHARS of text at a time).
Each worker process runs one thread: the pool's processes already take the cores, so a Hugging
Face tokenizer's own threads are switched off in them (they would only compete, and after a
fork they can deadlock). Inline, the tokenizer may use its own threads. The ids are the same
either way.

Each document also gets two seeded 64-bit keys of its content (`content_keys`): one decides its
split, the other its place in the seeded shuffle that fills the shards. Both depend on the
document's bytes and the seed only: not on file names, input order or the machine.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.data.clean import Cleaner, Verdict
from pretrain.data.sources import Document, Unit, iter_unit_docs
from pretrain.tokenizer import TextTokenizer, load_tokenizer

BATCH_CHARS = 1 << 20  # text per encode call: amortises the call, bounds a worker's memory


def content_keys(content: bytes, seed: int) -> tuple[int, int]:
    """(split key, order key): two independent seeded 64-bit hashes of a document's bytes."""
    d = hashlib.blake2b(content, digest_size=16, key=f"pretrain-doc:{seed}".encode()).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


@dataclass
class TokenizedDoc:
    tokens: bytes  # little-endian token ids, EOS included
    mask: bytes | None  # uint8 per token (1 = response), None when every token is one
    ntokens: int
    split_key: int
    order_key: int
    where: str = ""  # the input key (file, file:line, file@offset)
    verdict: Verdict | None = None  # what cleaning found (None: cleaning off)


@dataclass
class UnitResult:
    docs: list[TokenizedDoc]
    skipped: list[tuple[str, str]]  # (reason, where)
    unreadable: str | None = None  # why the unit could not be read at all


_TOK: TextTokenizer | None = None
_DTYPE: Any = None
_SEED = 0
_CLEAN: Cleaner | None = None


def _init_worker(
    tokenizer: str, dtype: str, seed: int, cleaner: Cleaner | None, pooled: bool = False
) -> None:
    global _TOK, _DTYPE, _SEED, _CLEAN
    if pooled:  # before the tokenizer runs: it reads this at every batch
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK = load_tokenizer(tokenizer)
    _DTYPE, _SEED, _CLEAN = np.dtype(dtype), seed, cleaner


def _encode(batch: list[tuple[Document, str, Verdict | None]]) -> list[TokenizedDoc]:
    assert _TOK is not None
    out = []
    encoded = _TOK.encode_documents([(doc.prompt, doc.text) for doc, _, _ in batch])
    for (doc, where, verdict), (ids, context) in zip(batch, encoded):
        mask = None
        if doc.prompt:
            m = np.ones(len(ids), np.uint8)
            m[:context] = 0
            mask = m.tobytes()
        split_key, order_key = content_keys(doc.content(), _SEED)
        tokens = np.asarray(ids, dtype=_DTYPE).tobytes()
        out.append(TokenizedDoc(tokens, mask, len(ids), split_key, order_key, where, verdict))
    return out


def _encode_unit(unit: Unit) -> UnitResult:
    docs: list[TokenizedDoc] = []
    skipped: list[tuple[str, str]] = []
    batch: list[tuple[Document, str, Verdict | None]] = []
    chars = 0
    try:
        for doc, reason, where in iter_unit_docs(unit):
            if doc is None:
                skipped.append((str(reason), where))
                continue
            verdict = None
            if _CLEAN is not None:  # before tokenizing: redaction changes the text
                doc, verdict = _CLEAN.apply(doc)
            batch.append((doc, where, verdict))
            chars += len(doc.text) + len(doc.prompt)
            if chars >= BATCH_CHARS:
                docs += _encode(batch)
                batch, chars = [], 0
        docs += _encode(batch)
    except (OSError, EOFError, ValueError) as exc:  # ValueError: zlib/gzip damage
        return UnitResult([], [], f"{type(exc).__name__}: {exc}")
    return UnitResult(docs, skipped)


class tokenized:
    """Context manager yielding each unit's UnitResult in input order, whatever num_proc is,
    from a process pool (num_proc > 1) or inline."""

    def __init__(
        self,
        units: list[Unit],
        tokenizer: str,
        dtype: str,
        seed: int,
        num_proc: int,
        cleaner: Cleaner | None = None,
    ) -> None:
        """`tokenizer`: the path `load_tokenizer` reads in each worker; `cleaner`: the
        cleaning stages each document goes through first (`pretrain.data.clean`)."""
        self.units, self.num_proc = units, num_proc
        self.args = (tokenizer, dtype, seed, cleaner)
        self.pool: Any = None

    def __enter__(self) -> Iterable[UnitResult]:
        if self.num_proc <= 1:
            _init_worker(*self.args)
            return map(_encode_unit, self.units)
        # fork where there is one (as torch's DataLoader does): workers start in milliseconds and
        # run only the tokenizer and numpy, never torch, so a forked torch runtime is harmless.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.pool = mp.get_context(method).Pool(
            self.num_proc, initializer=_init_worker, initargs=(*self.args, True)
        )
        chunk = max(1, min(8, len(self.units) // (8 * self.num_proc)))
        return self.pool.imap(_encode_unit, self.units, chunksize=chunk)

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
