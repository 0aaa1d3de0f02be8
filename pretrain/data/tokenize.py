"""Tokenizing prepare's documents, in worker processes (or inline when num_proc == 1).

A document's tokens are `sp.encode(prompt) + sp.encode(text) + [EOS]` with plain sentencepiece
and the data dir's tokenizer.model (`prompt` is "" for plain documents, so theirs are
`sp.encode(text) + [EOS]`). Prompt and response are encoded apart, so no piece spans the
boundary and the loss mask is exact: 0 for the prompt's tokens, 1 for the response's and EOS.

Each document also gets two seeded 64-bit keys of its content (`content_keys`): one decides its
split, the other its place in the seeded shuffle that fills the shards. Both depend on the
document's bytes and the seed only: not on file names, input order or the machine.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.data.sources import Unit, iter_unit_docs
from pretrain.tokenizer import EOS_ID


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


@dataclass
class UnitResult:
    docs: list[TokenizedDoc]
    skipped: list[tuple[str, str]]  # (reason, where)
    unreadable: str | None = None  # why the unit could not be read at all


_SP: Any = None
_DTYPE: Any = None
_SEED = 0


def _init_worker(model_path: str, dtype: str, seed: int) -> None:
    import sentencepiece as spm

    global _SP, _DTYPE, _SEED
    _SP = spm.SentencePieceProcessor(model_file=model_path)
    _DTYPE, _SEED = np.dtype(dtype), seed


def _encode_unit(unit: Unit) -> UnitResult:
    docs, skipped = [], []
    try:
        for doc, reason, where in iter_unit_docs(unit):
            if doc is None:
                skipped.append((str(reason), where))
                continue
            prompt = _SP.encode(doc.prompt) if doc.prompt else []
            ids = prompt + _SP.encode(doc.text)
            ids.append(EOS_ID)
            mask = None
            if prompt:
                m = np.ones(len(ids), np.uint8)
                m[: len(prompt)] = 0
                mask = m.tobytes()
            split_key, order_key = content_keys(doc.content(), _SEED)
            docs.append(
                TokenizedDoc(
                    np.asarray(ids, dtype=_DTYPE).tobytes(), mask, len(ids), split_key, order_key
                )
            )
    except (OSError, EOFError, ValueError) as exc:  # ValueError: zlib/gzip damage
        return UnitResult([], [], f"{type(exc).__name__}: {exc}")
    return UnitResult(docs, skipped)


class tokenized:
    """Context manager yielding each unit's UnitResult in input order, whatever num_proc is,
    from a process pool (num_proc > 1) or inline."""

    def __init__(self, units: list[Unit], model: str, dtype: str, seed: int, num_proc: int) -> None:
        self.units, self.args, self.num_proc = units, (model, dtype, seed), num_proc
        self.pool: Any = None

    def __enter__(self) -> Iterable[UnitResult]:
        if self.num_proc <= 1:
            _init_worker(*self.args)
            return map(_encode_unit, self.units)
        # fork where there is one (as torch's DataLoader does): workers start in milliseconds and
        # run only sentencepiece and numpy, never torch, so a forked torch runtime is harmless.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.pool = mp.get_context(method).Pool(
            self.num_proc, initializer=_init_worker, initargs=self.args
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
