"""Decontamination: documents that share a long word n-gram with evaluation texts are dropped,
so that a benchmark is not trained on.

Texts: a .jsonl file (every string in each record: a task's context, choices and answers), a
.txt file (its whole text), or the name of a task shipped with pretrain (`pretrain/tasks/<name>/
*.jsonl`). Words are lowercased, with punctuation around them stripped; an n-gram is n
consecutive words (GPT-3's decontamination used 13). Evaluation texts shorter than n words are
not matched on their own: a short answer or a single line of code (`return self.data`) occurs
in countless documents that never saw the benchmark; an item is found by its longer context.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterator
from pathlib import Path

from pretrain.data.sources import PrepareError

_TASKS = Path(__file__).resolve().parents[2] / "tasks"
_STRIP = string.punctuation + "\u201c\u201d\u2018\u2019"


def words(text: str) -> list[str]:
    return [w for w in (t.strip(_STRIP).lower() for t in text.split()) if w]


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def texts_sha256(specs: list[str]) -> str:
    """One hash over the contents of every file `specs` name (what decontamination reads)."""
    h = hashlib.sha256()
    for spec in specs:
        for f in _files(spec):
            h.update(f"{f.name}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()


def _files(spec: str) -> list[Path]:
    path = Path(spec)
    if not path.exists() and (_TASKS / spec).is_dir():
        files = sorted((_TASKS / spec).glob("*.jsonl"))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt"))
    elif path.is_file():
        files = [path]
    else:
        tasks = sorted(
            p.name for p in _TASKS.iterdir() if p.is_dir() and not p.name.startswith("_")
        )
        raise PrepareError(
            f"clean.exclude: {spec!r} is neither a file, a directory nor a task shipped with "
            f"pretrain ({', '.join(tasks)}): give .jsonl/.txt evaluation files or a task name."
        )
    return files


def _texts(spec: str) -> Iterator[str]:
    for f in _files(spec):
        if f.suffix == ".jsonl":
            for lineno, line in enumerate(f.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        yield from _strings(json.loads(line))
                    except ValueError as exc:
                        raise PrepareError(
                            f"clean.exclude: {f}:{lineno} is not JSON: {exc}"
                        ) from exc
        else:
            yield f.read_text()


def eval_ngrams(specs: list[str], n: int) -> frozenset[str]:
    """Every n-gram (space-joined words) of the evaluation texts `specs` name."""
    grams: set[str] = set()
    for spec in specs:
        for text in _texts(spec):
            w = words(text)
            grams.update(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))
    return frozenset(grams)


def contaminated(text: str, grams: frozenset[str], n: int) -> bool:
    """Whether `text` holds one of the n-grams `grams`."""
    w = words(text)
    return any(" ".join(w[i : i + n]) in grams for i in range(len(w) - n + 1))
