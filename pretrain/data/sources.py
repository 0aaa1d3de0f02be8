"""Reading prepare's inputs: globs → files → work units → documents (no tokenizer here).

What a document is
    * `.txt` and `.py` files: the whole file is one document.
    * `.jsonl` and `.jsonl.gz` files: each non-blank line is a JSON object. One with string
      fields `prompt` and `response` is a fine-tuning record: the document is prompt then
      response, and training computes the loss on the response only (its `text`, if any, is
      ignored). Otherwise its string field `text` is one document.
    Text is the file's bytes decoded as strict UTF-8, nothing else: no newline translation, no
    Unicode normalisation, a byte-order mark stays a character. Documents that are empty (a
    record: whose response is empty), not valid UTF-8, or contain NUL characters (binary junk)
    are skipped and counted; so are unreadable files, invalid JSON lines and lines with neither
    a string `text` nor string `prompt` and `response`.
    The input `stdlib` is every `.py` file of the running Python's standard library
    (`sysconfig.get_paths()["stdlib"]`, without site-packages): a corpus that is always there.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf

STDLIB = "stdlib"
SUPPORTED = (".txt", ".py", ".jsonl", ".jsonl.gz")
JSONL_CHUNK_BYTES = 8 << 20  # plain .jsonl files are tokenized in chunks this big, in parallel
MAX_EXAMPLES = 5  # skipped-input examples kept per reason


class PrepareError(RuntimeError):
    """A problem with the inputs or the output directory, phrased as what to do about it."""


class Document(NamedTuple):
    """One document: `text` is what the loss is computed on; `prompt` (fine-tuning records
    only, else "") comes before it and is context only."""

    text: str
    prompt: str = ""

    def content(self) -> bytes:
        """The UTF-8 bytes that identify the document (its split and place hash these)."""
        if not self.prompt:
            return self.text.encode()
        return self.prompt.encode() + b"\0" + self.text.encode()


@dataclass(frozen=True)
class Unit:
    """A piece of work for one tokenizer process: a whole file, or a byte range of a .jsonl."""

    path: str
    kind: str  # "text" | "jsonl" | "jsonl.gz"
    start: int = 0
    end: int = -1  # -1: to the end of the file


def stdlib_files() -> list[str]:
    """The embedded corpus (`input=stdlib`): every .py file of the running Python's standard
    library, without site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    skip = {"site-packages", "dist-packages"}
    return [f for f in files if not skip & set(Path(f).relative_to(root).parts)]


def as_list(spec: Any) -> list[str]:
    if isinstance(spec, str):
        return [spec]
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        return list(spec)
    raise PrepareError(
        f"input={spec!r} is not a glob or a list of globs; e.g. input=data/*.txt or "
        f"'input=[a/*.jsonl.gz,b/**/*.txt]' or input={STDLIB}."
    )


def roots(spec: Any) -> list[str]:
    """The input specs as recorded in the manifest (`stdlib` resolved to its directory)."""
    return [sysconfig.get_paths()["stdlib"] if s == STDLIB else s for s in as_list(spec)]


def _kind(path: str) -> str | None:
    if path.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith((".txt", ".py")):
        return "text"
    return None


def resolve_inputs(spec: Any) -> tuple[list[str], list[str]]:
    """(sorted absolute paths of supported files, unsupported files that matched)."""
    found: set[str] = set()
    for pattern in as_list(spec):
        if pattern == STDLIB:
            matches = stdlib_files()
        elif os.path.isdir(os.path.expanduser(pattern)):
            base = os.path.expanduser(pattern)
            matches = glob.glob(os.path.join(base, "**", "*"), recursive=True)
        else:
            matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise PrepareError(
                f"input {pattern!r} matches no files (relative to {os.getcwd()}); check the path, "
                f"quote globs so the shell does not expand them, or use input={STDLIB}."
            )
        found.update(os.path.abspath(m) for m in matches)
    files = sorted(found)
    return [f for f in files if _kind(f)], [f for f in files if not _kind(f)]


def make_units(files: list[str]) -> list[Unit]:
    units = []
    for path in files:
        kind = _kind(path)
        assert kind is not None
        size = os.path.getsize(path) if kind == "jsonl" else 0
        if kind == "jsonl" and size > JSONL_CHUNK_BYTES:
            for start in range(0, size, JSONL_CHUNK_BYTES):
                units.append(Unit(path, kind, start, min(start + JSONL_CHUNK_BYTES, size)))
        else:
            units.append(Unit(path, kind))
    return units


def _check_text(text: str) -> str | None:
    """Skip reason for a decoded document, or None when it is a usable document."""
    if not text:
        return "empty"
    if "\x00" in text:
        return "binary"
    return None


def _decode(data: bytes) -> tuple[Document | None, str | None]:
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    reason = _check_text(text)
    return (None, reason) if reason else (Document(text), None)


def _utf8_ok(*texts: str) -> bool:
    # JSON escapes can smuggle in lone surrogates, which are not UTF-8.
    try:
        for t in texts:
            t.encode("utf-8", errors="strict")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl_line(line: bytes) -> tuple[Document | None, str | None]:
    try:
        obj = json.loads(line.decode("utf-8", errors="strict"))
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except ValueError:
        return None, "invalid_json"
    if not isinstance(obj, dict):
        return None, "no_text"
    prompt, response = obj.get("prompt"), obj.get("response")
    if isinstance(prompt, str) and isinstance(response, str):
        if not _utf8_ok(prompt, response):
            return None, "invalid_utf8"
        if "\x00" in prompt:
            return None, "binary"
        reason = _check_text(response)
        return (None, reason) if reason else (Document(response, prompt), None)
    text = obj.get("text")
    if not isinstance(text, str):
        return None, "no_text"
    if not _utf8_ok(text):
        return None, "invalid_utf8"
    reason = _check_text(text)
    return (None, reason) if reason else (Document(text), None)


def iter_unit_docs(unit: Unit) -> Iterator[tuple[Document | None, str | None, str]]:
    """Yield (document, None, where) per document and (None, reason, where) per skipped one.

    Raises OSError/EOFError/zlib errors when the file cannot be read; callers treat the whole
    unit as unreadable then (so a damaged .gz never contributes half its documents)."""
    if unit.kind == "text":
        with open(unit.path, "rb") as f:
            doc, reason = _decode(f.read())
        yield doc, reason, unit.path
        return
    opener = gzip.open if unit.kind == "jsonl.gz" else open
    with opener(unit.path, "rb") as f:
        if unit.start > 0:
            # A line belongs to the chunk holding its first byte: finish the line that started
            # before this chunk (when the byte before `start` is a newline this reads just it).
            f.seek(unit.start - 1)
            f.readline()
        lineno = 0
        while unit.end < 0 or f.tell() < unit.end:
            pos = f.tell() if unit.kind == "jsonl" else lineno
            line = f.readline()
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue  # blank lines separate nothing and are not documents
            doc, reason = _jsonl_line(line)
            where = f"{unit.path}@{pos}" if unit.kind == "jsonl" else f"{unit.path}:{lineno}"
            yield doc, reason, where


def seeded_hash(data: bytes, seed: int) -> int:
    """A seeded 64-bit hash (orders the tokenizer's training sample)."""
    return int.from_bytes(
        hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest(), "little"
    )


class Skips:
    """Skipped inputs by reason: a count and a few examples each."""

    def __init__(self) -> None:
        self.by_reason: dict[str, dict[str, Any]] = {}

    def add(self, reason: str, where: str) -> None:
        entry = self.by_reason.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(where)

    def as_dict(self) -> dict[str, Any]:
        return {k: self.by_reason[k] for k in sorted(self.by_reason)}

    def summary(self) -> str:
        return ", ".join(f"{v['count']} {k}" for k, v in self.as_dict().items()) or "none"


def training_sample(
    units: list[Unit], sample_bytes: int, max_sentence_bytes: int, seed: int, skips: Skips
) -> Iterator[str]:
    """A bounded, deterministic sample of text for the tokenizer: whole files in seeded-hash
    order, each document cut at line ends into pieces of at most max_sentence_bytes."""
    # Hash paths relative to the inputs' common directory: the sample (so the tokenizer) stays
    # the same when the corpus is moved or is another install's copy of the stdlib.
    base = os.path.commonpath([u.path for u in units]) if len(units) > 1 else ""
    order = sorted(
        units,
        key=lambda u: seeded_hash(
            f"{os.path.relpath(u.path, base or None)}:{u.start}".encode(), seed
        ),
    )
    budget = sample_bytes
    for unit in order:
        try:
            for doc, reason, where in iter_unit_docs(unit):
                if doc is None:
                    skips.add(str(reason), where)
                    continue
                for part in (doc.prompt, doc.text):
                    for piece in _pieces(part, max_sentence_bytes):
                        yield piece
                        budget -= len(piece.encode())
                        if budget <= 0:
                            return
        except (OSError, EOFError, ValueError) as exc:
            skips.add("unreadable", f"{unit.path} ({type(exc).__name__}: {exc})")


def _pieces(text: str, max_bytes: int) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if buf and size + n > max_bytes:
            yield "".join(buf)
            buf, size = [], 0
        if n > max_bytes:  # a very long line: cut it (a char is at most 4 UTF-8 bytes)
            step = max(1, max_bytes // 4)
            for i in range(0, len(line), step):
                yield line[i : i + step]
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)
