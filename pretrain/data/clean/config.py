"""The cleaning settings of `pretrain.prepare` (`clean.*`): typed, each with its default and why.

Defaults: exact dedup on (cheap: one 16-byte hash per document, and a corpus's copies are pure
waste and memorisation); near dedup, quality rules, decontamination and PII redaction off,
since each changes or drops text a user may mean to keep (code, logs, templated pages, the
addresses in an RFC): they are one switch each, and the report says what each would remove.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Dedup(Enum):
    """What counts as a duplicate: nothing, the same normalised text, or a near copy."""

    off = "off"
    exact = "exact"
    near = "near"  # MinHash LSH over word n-grams, exact copies included


class Switch(Enum):
    off = "off"
    on = "on"


class Pii(Enum):
    off = "off"
    redact = "redact"  # e-mail, IPv4/IPv6 addresses and phone numbers become placeholders


@dataclass
class QualityConfig:
    """Gopher-style rules (Rae et al. 2021, as datatrove implements them) over whitespace words
    and non-blank lines; a document failing any rule is dropped. 0 turns a bound off. The
    defaults are Gopher's repetition thresholds, loosened where ordinary code and logs would
    fail them (measured on the standard-library corpus: see BENCHMARKS.md)."""

    min_words: int = 5
    """Fewer words than this: dropped (Gopher: 50, which removes short code files)."""
    max_words: int = 0
    """More words than this: dropped (Gopher: 100,000; 0 = no bound)."""
    max_dup_line_frac: float = 0.6
    """Share of non-blank lines that repeat an earlier line (Gopher: 0.3; code repeats
    `pass`, `return`, closing brackets)."""
    max_dup_line_char_frac: float = 0.5
    """Share of characters in such repeated lines (Gopher: 0.2)."""
    max_dup_para_frac: float = 0.3
    """Share of paragraphs (blank-line separated) that repeat an earlier one (Gopher's)."""
    max_top_ngram_char_frac: list[float] = field(default_factory=lambda: [0.2, 0.18, 0.16])
    """For n = 2, 3, 4: the most frequent word n-gram's share of the characters (Gopher's)."""
    max_dup_ngram_char_frac: list[float] = field(
        default_factory=lambda: [0.3, 0.29, 0.28, 0.27, 0.26, 0.25]
    )
    """For n = 5 .. 10: share of characters in word n-grams seen earlier in the document
    (Gopher: 0.15 .. 0.10, which drops much test code)."""
    min_mean_word_len: float = 2.0
    """Mean word length below this: dropped (Gopher: 3)."""
    max_mean_word_len: float = 20.0
    """Mean word length above this (base64, minified blobs): dropped (Gopher: 10)."""
    max_symbol_word_ratio: float = 0.0
    """'#' and '...' per word (Gopher: 0.1; off by default: every Python comment has one)."""
    min_alpha_word_frac: float = 0.0
    """Share of words with a letter (Gopher: 0.8; off by default: code's `=`, `(`, `0`)."""


@dataclass
class CleanConfig:
    dedup: Dedup = Dedup.exact
    """off | exact (the same text after whitespace is normalised) | near (MinHash LSH)."""
    near_ngram: int = 5
    """Word n-grams that near dedup compares (FineWeb: 5)."""
    near_bands: int = 14
    """LSH bands (FineWeb: 14 buckets)."""
    near_rows: int = 8
    """MinHash values per band (FineWeb: 8); bands x rows is the signature's length."""
    near_threshold: float = 0.75
    """A candidate is a near copy when its signatures estimate a Jaccard similarity at or above
    this (FineWeb's bands and rows make ~0.75 the similarity found half the time)."""
    exclude: list[str] = field(default_factory=list)
    """Evaluation texts not to train on: .jsonl (every string in each record), .txt files, or
    a task shipped with pretrain (e.g. `pyline`); documents sharing an n-gram are dropped."""
    exclude_ngram: int = 13
    """Words in the n-grams that decontamination matches (GPT-3's 13-grams)."""
    quality: Switch = Switch.off
    """on: drop documents that fail a rule of `quality_rules`."""
    quality_rules: QualityConfig = field(default_factory=QualityConfig)
    """The rules' thresholds."""
    pii: Pii = Pii.off
    """off | redact: e-mail, IP addresses and phone numbers replaced by placeholders."""
    report_samples: int = 20
    """Affected documents per rule written to clean_report.jsonl (input key and excerpt)."""
    seed: int = 1
    """Seeds MinHash's permutations (part of the prepare's identity)."""
