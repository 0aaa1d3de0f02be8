"""Quality rules: Gopher's repetition and word statistics (Rae et al. 2021, the definitions of
datatrove's GopherRepetitionFilter and GopherQualityFilter) over whitespace words.

Why our own: datatrove's word rules split words with spaCy's English tokenizer (an extra
~40 MB dependency tree for prepare's workers); whitespace words are what these statistics
were defined on for web text, and they treat code and logs the same every time. Each rule has
a name (what the report counts) and a threshold in `QualityConfig` (0 = off).
"""

from __future__ import annotations

import re
from collections import Counter

from pretrain.data.clean.config import QualityConfig

_LINES = re.compile(r"\n+")
_PARAS = re.compile(r"\n{2,}")


def _dups(items: list[str]) -> tuple[int, int]:
    """(elements equal to an earlier one, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the most frequent word n-gram times its count (Gopher's top n-gram)."""
    if len(words) < n:
        return 0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return count * sum(len(w) for w in gram) if count > 1 else 0


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of words inside n-grams that occurred earlier in the document (each word
    counted once: a repeated n-gram skips its n words, as datatrove's find_all_duplicate)."""
    seen: set[tuple[str, ...]] = set()
    chars, i = 0, 0
    while i + n <= len(words):
        gram = tuple(words[i : i + n])
        if gram in seen:
            chars += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def failed_rule(text: str, q: QualityConfig) -> str | None:
    """The name of the first rule `text` fails, or None when it passes them all."""
    words = text.split()
    if q.min_words and len(words) < q.min_words:
        return "min_words"
    if q.max_words and len(words) > q.max_words:
        return "max_words"
    if not words:
        return None
    mean = sum(len(w) for w in words) / len(words)
    if q.min_mean_word_len and mean < q.min_mean_word_len:
        return "min_mean_word_len"
    if q.max_mean_word_len and mean > q.max_mean_word_len:
        return "max_mean_word_len"
    if q.max_symbol_word_ratio:
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / len(words) > q.max_symbol_word_ratio:
            return "max_symbol_word_ratio"
    if q.min_alpha_word_frac:
        alpha = sum(1 for w in words if any(c.isalpha() for c in w))
        if alpha / len(words) < q.min_alpha_word_frac:
            return "min_alpha_word_frac"
    total = max(len(text), 1)
    lines = [ln for ln in _LINES.split(text) if ln.strip()]
    if lines:
        n, chars = _dups(lines)
        if q.max_dup_line_frac and n / len(lines) > q.max_dup_line_frac:
            return "max_dup_line_frac"
        if q.max_dup_line_char_frac and chars / total > q.max_dup_line_char_frac:
            return "max_dup_line_char_frac"
    paras = [p for p in _PARAS.split(text.strip()) if p.strip()]
    if q.max_dup_para_frac and paras and _dups(paras)[0] / len(paras) > q.max_dup_para_frac:
        return "max_dup_para_frac"
    for n, limit in zip(range(2, 5), q.max_top_ngram_char_frac):
        if limit and _top_ngram_chars(words, n) / total > limit:
            return f"max_top_{n}gram_char_frac"
    for n, limit in zip(range(5, 11), q.max_dup_ngram_char_frac):
        if limit and _dup_ngram_chars(words, n) / total > limit:
            return f"max_dup_{n}gram_char_frac"
    return None
