"""Duplicates: exact (the same text once whitespace runs are one space) and near (MinHash over
word n-grams, found with LSH banding).

The signatures are computed in prepare's worker processes (`exact_key`, `signature`); the
decisions are taken in the main process in input order (`Deduper`), so the first copy in input
order survives, whatever num_proc is, over the whole corpus (train and val are split later).

MinHash: rensa's RMinHash (Rust; 50-90k documents/s for sketching alone on this project's
2-core machine, against datasketch's 1-2k), over the set of lowercased word n-grams. LSH: b
bands of r values each; two documents whose signatures agree on a whole band are candidates,
and a candidate is a near copy when the share of equal values over the whole signature (the
estimate of their Jaccard similarity) is at least the threshold. A document is compared only
with the kept documents it shares a band with.

Memory (the main process; no text is kept): exact, one 16-byte key per kept document in a set
(~100 bytes each with Python's overhead); near, in addition its signature (4 bytes per value,
b x r = 112 by default: 448 bytes) and b band keys in a dict (~150 bytes each): ~3.2 KB per
kept document measured (BENCHMARKS.md), 3.2 GB for 1M documents. Workers hold one document.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """What exact dedup compares: the text with every run of whitespace one space, stripped."""
    return _SPACE.sub(" ", text).strip()


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()


def shingles(text: str, n: int) -> list[str]:
    """The document's lowercased word n-grams, repeats included (MinHash takes a minimum, so a
    repeat changes nothing); its words joined, when it has fewer than n."""
    words = text.lower().split()
    if len(words) <= n:
        return [" ".join(words)]
    return list(map(" ".join, zip(*(words[i:] for i in range(n)))))


def signature(text: str, n: int, num_perm: int, seed: int) -> bytes:
    """The MinHash signature [num_perm] uint32 of the document's word n-grams, as bytes."""
    from rensa import RMinHash  # in the workers only

    m = RMinHash(num_perm=num_perm, seed=seed)
    m.update(shingles(text, n))
    return np.asarray(m.digest(), np.uint32).tobytes()


@dataclass
class Deduper:
    """Keeps the first copy in the order documents are offered. `near`: also near copies, with
    LSH over `bands` x `rows` MinHash values and the estimated-Jaccard `threshold`."""

    near: bool
    bands: int = 14
    rows: int = 8
    threshold: float = 0.75
    _exact: dict[bytes, int] = field(default_factory=dict)
    _buckets: dict[bytes, list[int]] = field(default_factory=dict)
    _sigs: list[np.ndarray] = field(default_factory=list)
    _ids: list[int] = field(default_factory=list)  # the caller's id of each kept signature

    def check(self, ident: int, key: bytes, sig: bytes | None) -> tuple[str, int] | None:
        """None when the document is kept (and remembered); else (rule, the id of the kept
        document it copies), the rule being "exact_duplicate" or "near_duplicate"."""
        if key in self._exact:
            return "exact_duplicate", self._exact[key]
        bands: list[bytes] = []
        if self.near and sig is not None:  # None: a fine-tuning record, exact only
            s = np.frombuffer(sig, np.uint32)
            width = self.rows * 4
            bands = [
                b.to_bytes(2, "little") + sig[b * width : (b + 1) * width]
                for b in range(self.bands)
            ]
            seen: set[int] = set()
            for band in bands:
                for k in self._buckets.get(band, ()):
                    if k not in seen:
                        seen.add(k)
                        if float(np.mean(self._sigs[k] == s)) >= self.threshold:
                            return "near_duplicate", self._ids[k]
        self._exact[key] = ident
        if bands:
            k = len(self._sigs)
            self._sigs.append(s)
            self._ids.append(ident)
            for band in bands:
                self._buckets.setdefault(band, []).append(k)
        return None
