"""A corpus with planted problems, and what was planted: for the cleaning tests and benchmark.

Distinct documents are standard-library .py files (a deterministic subset, none under 2 kB);
then, in one .jsonl in a seeded order: exact copies of some, near copies of others (1% of their
words replaced), documents with an e-mail address, an IP address and a phone number planted,
and junk (one line repeated 400 times)."""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from tests.data_fixtures import stdlib_subset


@dataclass
class Planted:
    path: Path
    distinct: list[str]  # the distinct documents as written (planted personal data included)
    exact: list[int] = field(default_factory=list)  # indices into distinct copied verbatim
    near: list[int] = field(default_factory=list)  # indices copied with 1% of words changed
    pii: list[str] = field(default_factory=list)  # every planted personal string
    pii_docs: list[int] = field(default_factory=list)  # indices with planted strings
    junk: list[str] = field(default_factory=list)  # the junk documents' texts
    kinds: list[str] = field(default_factory=list)  # per line: distinct, exact, near or junk
    keys: list[str] = field(default_factory=list)  # per line: prepare's input key (path@offset)


def word_ngrams(text: str, n: int = 5) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    """Exact Jaccard similarity (0 at once when the sizes alone rule out 0.5)."""
    if min(len(a), len(b)) < 0.5 * max(len(a), len(b)):
        return 0.0
    return len(a & b) / len(a | b)


def _near_copy(text: str, rng: random.Random, share: float = 0.01) -> str:
    """`text` with max(1, share of its words) words replaced by other words (lines kept)."""
    lines = [ln.split(" ") for ln in text.split("\n")]
    spots = [(i, j) for i, ln in enumerate(lines) for j, w in enumerate(ln) if w.strip()]
    for i, j in rng.sample(spots, max(1, round(share * len(spots)))):
        lines[i][j] = f"changed{rng.randrange(10**6)}"
    return "\n".join(" ".join(ln) for ln in lines)


def _pii(rng: random.Random, k: int) -> list[str]:
    user = f"user{k}.name{rng.randrange(1000)}"
    ip = (
        f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        if k % 3
        else f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65536):x}"
    )
    phone = (
        f"+44 20 {rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}"
        if k % 2
        else f"({rng.randrange(200, 999)}) {rng.randrange(200, 999)}-{rng.randrange(1000, 9999)}"
    )
    return [f"{user}@example{k}.org", ip, phone]


def make_planted(
    dest: Path, distinct: int = 250, exact: int = 40, near: int = 40, pii: int = 30,
    junk: int = 10, seed: int = 0, near_share: float = 0.01,
) -> Planted:  # fmt: skip
    """Write `dest`/corpus.jsonl (see the module docstring); returns what was planted."""
    rng = random.Random(seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    grams: list[set[str]] = []
    for rel in stdlib_subset(distinct + 80, 2_000, 20_000):
        try:
            text = (root / rel).read_bytes().decode()
        except UnicodeDecodeError:
            continue
        g = word_ngrams(text)
        if all(jaccard(g, h) < 0.5 for h in grams):  # distinct: no near copy among them
            texts.append(text)
            grams.append(g)
    texts = texts[:distinct]
    truth = Planted(dest / "corpus.jsonl", texts)
    picks = rng.sample(range(len(texts)), exact + near + pii)
    truth.exact, truth.near = picks[:exact], picks[exact : exact + near]
    truth.pii_docs = picks[exact + near :]
    docs = list(texts)  # the distinct documents, personal data planted in some below
    for n, i in enumerate(truth.pii_docs):
        strings = _pii(rng, n)
        truth.pii += strings
        lines = docs[i].split("\n")
        for s in strings:
            at = rng.randrange(len(lines))
            lines.insert(at, f"# contact: {s}")
        docs[i] = "\n".join(lines)
    truth.distinct = docs
    extra = [("exact", docs[i]) for i in truth.exact]
    extra += [("near", _near_copy(docs[i], rng, near_share)) for i in truth.near]
    for n in range(junk):
        truth.junk.append(f"BUY NOW cheap offer number {n} click here\n" * 400)
    extra += [("junk", t) for t in truth.junk]
    rng.shuffle(extra)
    dest.mkdir(parents=True, exist_ok=True)
    # The distinct documents first (they are the copies kept: first in input order).
    lines = [("distinct", t) for t in docs] + extra
    offset = 0
    with open(truth.path, "wb") as f:
        for kind, text in lines:
            line = (json.dumps({"text": text}) + "\n").encode()
            truth.kinds.append(kind)
            truth.keys.append(f"{truth.path}@{offset}")
            f.write(line)
            offset += len(line)
    return truth
