"""The interface every consumer of a tokenizer uses, whatever it is stored as, and its hash.

A tokenizer is the set of files that define it (`contents`: standard file name -> bytes), read
from disk (`files`) or from a remote data dir. Its identity is one content hash over those
files (`content_sha256`), recorded by prepare in the manifest, so a model's tokenizer and a
data dir compare by content, wherever each was copied to.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar


class TokenizerError(ValueError):
    """A tokenizer that cannot be read or used; the one-line message says what to do."""


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


def content_sha256(contents: Mapping[str, bytes]) -> str:
    """One hash over a tokenizer's files: the sha256 of a line `name NUL sha256(bytes)` per
    file, sorted by name. A single file is hashed as itself, so a sentencepiece tokenizer's
    hash is its .model file's sha256 (what manifests have always recorded)."""
    if len(contents) == 1:
        return hashlib.sha256(next(iter(contents.values()))).hexdigest()
    h = hashlib.sha256()
    for name in sorted(contents):
        h.update(f"{name}\0{hashlib.sha256(contents[name]).hexdigest()}\n".encode())
    return h.hexdigest()


class TextTokenizer(ABC):
    """What callers need of a tokenizer, whatever it is stored as.

    kind        "sentencepiece" | "hf"
    path        what it was loaded from (a file or a directory; a URL for a remote data dir):
                `prepare tokenizer.path=<path>` tokenizes with this very tokenizer
    eos_id      the id that ends every document in prepared data
    bos_id      the tokenizer's BOS token, -1 = it has none
    add_bos     whether every document starts with bos_id (a Hugging Face post-processor that
                adds it, e.g. Llama 3's); never for sentencepiece
    vocab_size  ids it can produce, added tokens included (max id + 1)
    sha256      `content_sha256` of its files: the hash a manifest records
    files       its files on disk (empty for one read from a remote data dir: `write_files`
                writes it anywhere); a model's have their standard names
    contents    standard file name -> bytes, what `sha256` covers
    """

    kind: ClassVar[str]
    stored_name: ClassVar[str]  # its place in a data dir or run dir (`save`)
    path: str
    eos_id: int
    bos_id: int
    add_bos: bool = False
    pad_id: int = -1
    unk_id: int = -1
    vocab_size: int
    contents: dict[str, bytes]
    files: tuple[Path, ...] = ()

    @cached_property
    def sha256(self) -> str:
        return content_sha256(self.contents)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, nothing added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int] | Any) -> str:
        """Text of `ids` (a list, numpy array or 1-D tensor); special ids decode to nothing."""

    @abstractmethod
    def pieces(self) -> list[str]:
        """The vocabulary, by id."""

    def document_ends(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the text of every document in prepared data: BOS when the
        tokenizer adds one; what its post-processor appends, then EOS (once)."""
        return ([self.bos_id] if self.add_bos else []), [self.eos_id]

    def encode_documents(self, docs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
        """Each (prompt, text) as prepared data holds it, in one batch: (ids, context), ids =
        head + encode(prompt) + encode(text) + tail (`document_ends`), context = the ids before
        the text (head and prompt: never a target of the loss). Prompt and text are encoded
        apart, so no token spans the boundary."""
        prompts = [p for p, _ in docs if p]
        encoded = self.encode_batch([t for _, t in docs] + prompts)
        head, tail = self.document_ends()
        out, k = [], len(docs)
        for (prompt, _), ids in zip(docs, encoded):
            before = head
            if prompt:
                before, k = head + encoded[k], k + 1
            out.append((before + ids + tail, len(before)))
        return out

    def special_ids(self) -> dict[str, int]:
        """The special ids a manifest records."""
        return {"eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id,
                "unk_id": self.unk_id}  # fmt: skip

    @abstractmethod
    def stored_files(self) -> list[str]:
        """Its files' paths relative to a directory it is `save`d in."""

    def write_files(self, dest: str | Path) -> list[Path]:
        """Write its files into `dest` (created) under their standard names, each atomically."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.contents.items():
            write_atomic(dest / name, data)
        return [dest / name for name in self.contents]

    def save(self, directory: str | Path) -> Path:
        """Store it in a data dir or run dir (`stored_files`, each atomically); returns
        `directory/stored_name`, which `load_tokenizer` reads back."""
        for rel in self.stored_files():
            target = Path(directory) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, self.contents[target.name])
        return Path(directory) / self.stored_name

    def describe(self) -> str:
        """kind, path, hash prefix and size: enough to tell two tokenizers apart."""
        return describe(self.kind, self.path, self.sha256, self.vocab_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def describe(kind: str, path: str | Path, sha256: str, vocab_size: int) -> str:
    return f"{kind} {path} (sha256 {sha256[:12]}, {vocab_size:,} ids)"


# Text that exercises a tokenizer's whole pipeline: code, runs of spaces, tabs and newlines,
# digits, accents (composed and not), CJK and an emoji.
PROBE = "def f(x):\n\treturn {'a': [1, 2]}  # 12345 café cafe\u0301\n\n    naïve 東京 🙂 <s> </s>"


def differences(a: TextTokenizer, b: TextTokenizer) -> str | None:
    """None when `a` and `b` turn text into the same ids, else how they differ. Equal hashes
    are equal tokenizers; otherwise the same ids, special ids and encoding of a probe text mean
    the same tokenizer stored differently (our sentencepiece model as an exported tokenizer.json,
    a tokenizer.json next to rewritten config files)."""
    if a.sha256 == b.sha256:
        return None
    if a.vocab_size != b.vocab_size:
        return f"{a.vocab_size:,} vs {b.vocab_size:,} ids"
    if a.eos_id != b.eos_id:
        return f"EOS id {a.eos_id} vs {b.eos_id}"
    if a.document_ends() != b.document_ends():
        (a_head, a_tail), (b_head, b_tail) = a.document_ends(), b.document_ends()
        return f"documents are {a_head} + text + {a_tail} vs {b_head} + text + {b_tail}"
    ours, theirs = a.pieces(), b.pieces()
    if ours != theirs:
        i = next(i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y)
        return f"id {i} is {ours[i]!r} vs {theirs[i]!r}"
    if a.encode(PROBE) != b.encode(PROBE):
        return "the same pieces, but they split text differently"
    return None
