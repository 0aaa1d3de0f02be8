"""Writing prepared shards: a spill of tokenized documents, then size-bounded tar shards.

Prepare tokenizes documents in input order into a `Spill` (their token bytes appended to one
hidden temp file in the output dir, an index of offsets and keys in memory), then writes each
split's documents in the order it chooses (a seeded shuffle) with a `ShardWriter`. So the
shuffle spans the whole corpus at the cost of a temporary copy of its tokens on disk (removed at
the end, and by the next prepare if this one is interrupted).

Every file is written to a hidden temp name, fsynced, then renamed. The member layout and names
are `pretrain.data.format`'s.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import tarfile
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.format import Shard, document_members, shard_name
from pretrain.data.tokenize import TokenizedDoc


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:  # tarfile asks where it starts
        return self.nbytes

    def write(self, b: Any) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.nbytes += len(b)
        return len(b)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: identical inputs give byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes one split's documents into size-bounded tar shards, each atomically: a shard is
    closed before the document that would take it over `max_tokens` (a single longer document
    gets a shard of its own)."""

    def __init__(self, out: Path, split: str, max_tokens: int, ext: str) -> None:
        self.out, self.split, self.max_tokens, self.ext = out, split, max_tokens, ext
        self.records: list[Shard] = []
        self._tar: tarfile.TarFile | None = None
        (out / split).mkdir(parents=True, exist_ok=True)

    def add(self, key: str, tokens: bytes, mask: bytes | None, ntokens: int) -> str:
        """Append one document; returns the name of the shard that holds it."""
        if self._tar is not None and self._tokens + ntokens > self.max_tokens:
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for name, data in document_members(key, tokens, mask, self.ext):
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._docs += 1
        self._tokens += ntokens
        return self._name

    def close(self) -> list[Shard]:
        if self._tar is not None:
            self._finish()
        return self.records

    def abort(self) -> None:
        """Drop the shard being written (its temp file); finished shards stay."""
        if self._tar is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def _open(self) -> None:
        index = len(self.records)
        self._name = shard_name(self.split, index)
        final = self.out / self._name
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - lives until _finish/abort
        self._hw = _HashingWriter(self._file)
        self._tar = tarfile.open(  # noqa: SIM115 - closed in _finish
            fileobj=self._hw,  # type: ignore[call-overload]
            mode="w",
            format=tarfile.USTAR_FORMAT,
        )
        self._docs = self._tokens = 0

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.out / self._name)
        self.records.append(
            Shard(self._name, self._docs, self._tokens, self._hw.nbytes, self._hw.sha.hexdigest())
        )
        self._tar = None


SPILL = ".spill.tmp"  # hidden temp names: an interrupted prepare's next run deletes them
SPILL_MASK = ".spill-mask.tmp"


class Spill:
    """Tokenized documents in input order: bytes in temp files under `out`, an index in memory
    (5 integers per document)."""

    def __init__(self, out: Path) -> None:
        self.paths = (out / SPILL, out / SPILL_MASK)
        self._files = [open(p, "wb") for p in self.paths]  # noqa: SIM115 - closed in finish
        self._pos = [0, 0]
        self.offset, self.mask_offset = array("q"), array("q")  # mask_offset -1: no mask
        self.ntokens = array("q")
        self.split_key, self.order_key = array("Q"), array("Q")
        self._maps: list[Any] = []

    def __len__(self) -> int:
        return len(self.ntokens)

    def add(self, doc: TokenizedDoc) -> None:
        self.offset.append(self._pos[0])
        self._files[0].write(doc.tokens)
        self._pos[0] += len(doc.tokens)
        if doc.mask is None:
            self.mask_offset.append(-1)
        else:
            self.mask_offset.append(self._pos[1])
            self._files[1].write(doc.mask)
            self._pos[1] += len(doc.mask)
        self.ntokens.append(doc.ntokens)
        self.split_key.append(doc.split_key)
        self.order_key.append(doc.order_key)

    def finish(self) -> None:
        """Stop appending; documents can be read back from now on."""
        for f in self._files:
            f.close()
        self._maps = [self._map(p) for p in self.paths]

    @staticmethod
    def _map(path: Path) -> Any:
        if path.stat().st_size == 0:
            return b""
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def document(self, i: int, itemsize: int) -> tuple[bytes, bytes | None]:
        """(token bytes, mask bytes or None) of document i."""
        n, off, moff = self.ntokens[i], self.offset[i], self.mask_offset[i]
        tokens = bytes(self._maps[0][off : off + n * itemsize])
        return tokens, (None if moff < 0 else bytes(self._maps[1][moff : moff + n]))

    def has_mask(self) -> bool:
        return self._pos[1] > 0

    def remove(self) -> None:
        for m in self._maps:
            if isinstance(m, mmap.mmap):
                m.close()
        for f in self._files:
            f.close()
        for p in self.paths:
            p.unlink(missing_ok=True)


def write_split(
    out: Path,
    split: str,
    spill: Spill,
    order: np.ndarray,
    max_tokens: int,
    ext: str,
    itemsize: int,
) -> list[Shard]:
    """Write documents `order` (indices into the spill) of one split into shards, in order.
    A document's key is its index in input order."""
    writer = ShardWriter(out, split, max_tokens, ext)
    try:
        for i in order.tolist():
            tokens, mask = spill.document(i, itemsize)
            writer.add(f"{i:08d}", tokens, mask, spill.ntokens[i])
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def fsync_dir(path: Path) -> None:
    if not path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
