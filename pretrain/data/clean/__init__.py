"""Cleaning in `pretrain.prepare`: exact and near-duplicate removal, decontamination against
evaluation texts, quality rules and personal-data redaction, with a report a user can audit.

Where each runs. In the worker processes, per document and before it is tokenized
(`Cleaner.apply`): PII redaction (the text is changed), then the rules that drop a document on
its own (decontamination, quality), then its dedup keys (exact hash, MinHash signature) of the
text as it will be trained. In the main process, in input order (`CleanPass.keep`): a dropped
document is counted; the rest go through dedup, where the first copy in input order survives.
So the result depends neither on num_proc nor on the machine. Dropped documents are still
tokenized, so that the report counts the tokens each rule removes.

The report: per rule, documents and tokens removed (or changed, for PII) and, for near dedup,
the clusters found (kept documents that had copies); prepare prints it, the manifest records it
(`clean`), and `clean_report.jsonl` holds up to `report_samples` documents per rule: input key,
rule, a short excerpt of the (redacted) text, and for a duplicate the input key of the copy kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pretrain.data.clean.config import CleanConfig, Dedup, Pii, QualityConfig, Switch
from pretrain.data.clean.decontaminate import contaminated, eval_ngrams
from pretrain.data.clean.dedup import Deduper, exact_key, signature
from pretrain.data.clean.pii import redact
from pretrain.data.clean.quality import failed_rule
from pretrain.data.sources import Document

__all__ = [
    "REPORT", "CleanConfig", "CleanPass", "Cleaner", "Dedup", "Pii", "QualityConfig", "Switch",
    "Verdict",
]  # fmt: skip

REPORT = "clean_report.jsonl"
EXCERPT_CHARS = 160


@dataclass
class Verdict:
    """What the worker found for one document."""

    dropped: str | None = None  # the rule that drops it on its own, or None
    pii: dict[str, int] | None = None  # replacements made, when any
    key: bytes = b""  # exact dedup key of the final text
    sig: bytes | None = None  # MinHash signature (near dedup)
    excerpt: str = ""


class Cleaner:
    """The per-document stages, built once in the main process and sent to the workers."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.grams = eval_ngrams(cfg.exclude, cfg.exclude_ngram) if cfg.exclude else frozenset()

    @property
    def active(self) -> bool:
        c = self.cfg
        return c.dedup != Dedup.off or bool(c.exclude) or c.quality == Switch.on or c.pii != Pii.off

    def apply(self, doc: Document) -> tuple[Document, Verdict]:
        c, v = self.cfg, Verdict()
        if c.pii == Pii.redact:
            text, counts = redact(doc.text)
            prompt, pcounts = redact(doc.prompt) if doc.prompt else ("", {})
            total = {k: counts[k] + pcounts.get(k, 0) for k in counts}
            if any(total.values()):
                doc, v.pii = Document(text, prompt), total
        whole = f"{doc.prompt}\n{doc.text}" if doc.prompt else doc.text
        v.excerpt = whole[:EXCERPT_CHARS]
        if self.grams and contaminated(whole, self.grams, c.exclude_ngram):
            v.dropped = "decontaminated"
        elif c.quality == Switch.on:
            rule = failed_rule(whole, c.quality_rules)
            v.dropped = f"quality:{rule}" if rule else None
        if v.dropped is None and c.dedup != Dedup.off:
            # A fine-tuning record: prompt and response apart, and exact copies only (records
            # that share a long template prompt would all look like near copies of the first).
            v.key = exact_key(doc.prompt + "\0" + doc.text if doc.prompt else doc.text)
            if c.dedup == Dedup.near and not doc.prompt:
                v.sig = signature(whole, c.near_ngram, c.near_bands * c.near_rows, c.seed)
        return doc, v


@dataclass
class _Count:
    documents: int = 0
    tokens: int = 0


@dataclass
class CleanPass:
    """The main process's side: decides dedup in input order and keeps the report."""

    cfg: CleanConfig
    rules: dict[str, _Count] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=lambda: {"email": 0, "ip": 0, "phone": 0})
    samples: list[dict[str, Any]] = field(default_factory=list)
    clusters: set[int] = field(default_factory=set)
    kept: _Count = field(default_factory=_Count)
    _where: list[str] = field(default_factory=list)  # input key of each kept document
    _per_rule: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.cfg
        self.dedup = (
            Deduper(c.dedup == Dedup.near, c.near_bands, c.near_rows, c.near_threshold)
            if c.dedup != Dedup.off
            else None
        )

    def keep(self, v: Verdict | None, where: str, ntokens: int) -> bool:
        """Whether the document goes into the data (recorded either way)."""
        if v is None:
            self.kept.documents += 1
            self.kept.tokens += ntokens
            return True
        rule, twin = v.dropped, None
        if rule is None and self.dedup is not None:
            found = self.dedup.check(len(self._where), v.key, v.sig)
            if found is not None:
                rule, twin = found
                if rule == "near_duplicate":
                    self.clusters.add(twin)
        if rule is not None:
            self._count(rule, ntokens, where, v.excerpt, twin)
            return False
        if v.pii:
            for k, n in v.pii.items():
                self.pii[k] += n
            self._count("pii", ntokens, where, v.excerpt, None)
        if self.dedup is not None:  # a later copy names this one by its index here
            self._where.append(where)
        self.kept.documents += 1
        self.kept.tokens += ntokens
        return True

    def _count(self, rule: str, ntokens: int, where: str, excerpt: str, twin: int | None) -> None:
        c = self.rules.setdefault(rule, _Count())
        c.documents += 1
        c.tokens += ntokens
        if self._per_rule.get(rule, 0) < self.cfg.report_samples:
            self._per_rule[rule] = self._per_rule.get(rule, 0) + 1
            sample = {"input": where, "rule": rule, "excerpt": excerpt}
            if twin is not None:
                sample["duplicate_of"] = self._where[twin]
            self.samples.append(sample)

    def as_dict(self) -> dict[str, Any]:
        """The manifest's `clean` record."""
        rules: dict[str, dict[str, Any]] = {
            k: {"documents": c.documents, "tokens": c.tokens} for k, c in sorted(self.rules.items())
        }
        if "pii" in rules:
            rules["pii"]["replacements"] = dict(self.pii)
        if "near_duplicate" in rules:
            rules["near_duplicate"]["clusters"] = len(self.clusters)
        return {
            "kept": {"documents": self.kept.documents, "tokens": self.kept.tokens},
            "rules": rules,
        }

    def summary(self) -> list[str]:
        """Lines for prepare's output."""
        seen = self.kept.documents + sum(c.documents for k, c in self.rules.items() if k != "pii")
        out = []
        for rule, entry in self.as_dict()["rules"].items():
            verb = "changed" if rule == "pii" else "removed"
            extra = ""
            if rule == "pii":
                extra = ", " + ", ".join(f"{n} {k}" for k, n in self.pii.items())
            if rule == "near_duplicate":
                extra = f", {entry['clusters']} clusters"
            out.append(
                f"  clean {rule}: {verb} {entry['documents']:,} of {seen:,} documents "
                f"({entry['tokens']:,} tokens){extra}"
            )
        return out or ["  clean: nothing removed or changed"]

    def report(self) -> str:
        """clean_report.jsonl's text: the samples, one JSON object per line."""
        return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in self.samples)
