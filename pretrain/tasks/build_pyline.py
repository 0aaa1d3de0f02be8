"""`python -m pretrain.tasks.build_pyline [--out PATH] [--items N]`: build pyline's data.

A multiple-choice item shows CONTEXT_LINES consecutive lines of a Python file and asks which
line comes next: the true line, or one of three lines taken from other files with exactly the
same indentation (so indentation gives nothing away). The text is the Python standard library
of the interpreter that runs the builder, the same corpus as the demo (`pretrain.prepare`'s
default input), so nothing is downloaded; a model trained on that corpus has seen these files,
which makes pyline a smoke test of the evaluation path and of learning, not a held-out benchmark.

Deterministic: files are taken in the order of the sha256 of their path, positions and
distractors are chosen by sha256 of names, never by a random generator, so the same stdlib
gives the same file byte for byte. The shipped pyline/pyline.jsonl was built from CPython
3.11's standard library with the defaults below; rebuild it with this command (another Python
version gives other items).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sysconfig
from pathlib import Path

from pretrain.data.sources import stdlib_files
from pretrain.tasks import TASKS_DIR

CONTEXT_LINES = 6
CHOICES = 4
ITEMS = 200
OUT = TASKS_DIR / "pyline" / "pyline.jsonl"


def _h(*parts: str) -> int:
    return int(hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16], 16)


def good_line(line: str) -> bool:
    """A line worth asking for: code (not a comment or a lone bracket), of moderate length."""
    s = line.strip()
    return (
        10 <= len(s) <= 70
        and not s.startswith(("#", '"""', "'''"))
        and any(c.isalpha() for c in s)
        and "\t" not in line
    )


def indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" "))]


def sources() -> list[tuple[str, list[str]]]:
    """(path relative to the stdlib, lines) of the stdlib's .py files, in sha256-of-path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in stdlib_files():
        rel = Path(f).relative_to(root).as_posix()
        if not 2_000 <= os.path.getsize(f) <= 60_000:
            continue
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append((rel, text.split("\n")))
    return sorted(out, key=lambda s: _h(s[0]))


def build(n_items: int = ITEMS) -> list[dict]:
    files = sources()
    # Distractor pool: every good line of every file, by indentation, with its file.
    pool: dict[str, list[tuple[str, str]]] = {}
    for rel, lines in files:
        for line in dict.fromkeys(lines):  # each distinct line once per file
            if good_line(line):
                pool.setdefault(indent(line), []).append((rel, line))
    items: list[dict] = []
    for rel, lines in files:
        if len(items) == n_items:
            break
        counts: dict[str, int] = {}
        for line in lines:
            counts[line] = counts.get(line, 0) + 1
        positions = [
            i
            for i in range(CONTEXT_LINES, len(lines))
            if good_line(lines[i])
            and counts[lines[i]] == 1  # unambiguous within its file
            and sum(bool(x.strip()) for x in lines[i - CONTEXT_LINES : i]) >= CONTEXT_LINES // 2
            and all(len(x) <= 120 for x in lines[i - CONTEXT_LINES : i])
        ]
        for i in sorted(positions, key=lambda i: _h(rel, str(i)))[:1]:
            answer = lines[i]
            item_id = f"pyline-{len(items):03d}"
            others = sorted(
                {line for src, line in pool.get(indent(answer), []) if src != rel} - {answer},
                key=lambda line: _h(item_id, line),
            )[: CHOICES - 1]
            if len(others) < CHOICES - 1:
                continue
            label = _h(item_id, "label") % CHOICES
            choices = others[:label] + [answer] + others[label:]
            items.append(
                {
                    "id": item_id,
                    "source": f"{rel}:{i + 1}",
                    "context": "\n".join(lines[i - CONTEXT_LINES : i]) + "\n",
                    "choices": choices,
                    "label": label,
                }
            )
    return items


def write(items: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items)
    out.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.tasks.build_pyline", description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--items", type=int, default=ITEMS)
    args = ap.parse_args(argv)
    items = build(args.items)
    write(items, args.out)
    print(f"wrote {len(items)} items to {args.out}")


if __name__ == "__main__":
    main()
