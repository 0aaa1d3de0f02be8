"""Session fixtures for tests that need prepared data: a small, deterministic stdlib corpus.

Register in tests/conftest.py with:  from tests.data_fixtures import tiny_data  # noqa: F401
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretrain.data.sources import stdlib_files
from pretrain.prepare import PrepareConfig, TokenizerConfig, run_prepare

# The tiny dataset: ~200 stdlib files (~650k tokens), vocab 512, shards of ~16k tokens (~40 train
# shards), 5% validation raised to the val minimum as far as 10% of the corpus allows (~19
# documents, ~64k tokens).
TINY_FILES = 200
TINY_VOCAB = 512
TINY_SHARD_TOKENS = 16_384
TINY_VAL_FRACTION = 0.05


def stdlib_subset(
    n_files: int = TINY_FILES, min_bytes: int = 2_000, max_bytes: int = 12_000
) -> list[Path]:
    """A deterministic subset of this interpreter's stdlib .py files (evenly spaced in sorted
    order among files of moderate size)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(Path(f) for f in stdlib_files())
    sized = [f for f in files if min_bytes <= os.path.getsize(f) <= max_bytes]
    step = max(1, len(sized) // n_files)
    return [f.relative_to(root) for f in sized[::step][:n_files]]


def make_corpus(dest: Path, n_files: int = TINY_FILES) -> Path:
    """Copy `stdlib_subset(n_files)` under `dest` (keeping relative paths); returns `dest`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in stdlib_subset(n_files):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
    return dest


def tiny_config(corpus: Path, output: Path, **overrides: object) -> PrepareConfig:
    cfg = PrepareConfig(
        input=str(corpus / "**" / "*.py"),
        output=str(output),
        tokenizer=TokenizerConfig(vocab_size=TINY_VOCAB),
        shard_tokens=TINY_SHARD_TOKENS,
        val_fraction=TINY_VAL_FRACTION,
        num_proc=2,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~200 stdlib .py files copied into a temp dir (the input of `tiny_data`)."""
    return make_corpus(tmp_path_factory.mktemp("tiny_corpus"))


def sft_records(n: int = 400) -> list[dict[str, str]]:
    """Fine-tuning records from the stdlib: prompt = a function's qualified name and signature
    line, response = the rest of its source. Deterministic; short prompts (<= ~40 tokens)."""
    import ast

    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[dict[str, str]] = []
    for rel in stdlib_subset(120):
        src = (root / rel).read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno:
                lines = src.splitlines(keepends=True)[node.lineno - 1 : node.end_lineno]
                if 3 <= len(lines) <= 40 and len(lines[0]) < 100:
                    prompt = f"# {rel.with_suffix('').as_posix().replace('/', '.')}\n{lines[0]}"
                    out.append({"prompt": prompt, "response": "".join(lines[1:])})
                    if len(out) == n:
                        return out
    return out


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A prepared dir of `sft_records()` (with tiny_data's tokenizer), plus 20 plain documents."""
    src = tmp_path_factory.mktemp("sft_corpus")
    lines = [json.dumps(r) for r in sft_records()]
    lines += [json.dumps({"text": f"plain document {i}\n" * 30}) for i in range(20)]
    (src / "records.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("sft_data") / "data"
    cfg = PrepareConfig(
        input=str(src / "records.jsonl"),
        output=str(out),
        tokenizer=TokenizerConfig(path=str(tiny_data / "tokenizer.model")),
        shard_tokens=4096,
        val_fraction=0.05,
        num_proc=1,
    )
    return run_prepare(cfg)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A prepared data dir (tokenizer.model, train/, val/, manifest.json) of `tiny_corpus`."""
    out = tmp_path_factory.mktemp("tiny_data") / "data"
    return run_prepare(tiny_config(tiny_corpus, out))


def prepare_code(
    tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, name: str, **overrides: object
) -> Path:
    """12 stdlib files of 12-30 kB (none of tiny_data's files, which are all under 12 kB),
    prepared with tiny_data's tokenizer into shards of ~4k tokens (`overrides`: PrepareConfig's)."""
    root, corpus = Path(sysconfig.get_paths()["stdlib"]), tmp_path_factory.mktemp(f"{name}_corpus")
    for rel in stdlib_subset(12, min_bytes=12_001, max_bytes=30_000):
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, corpus / rel)
    out = tmp_path_factory.mktemp(name) / "data"
    tok = TokenizerConfig(path=str(tiny_data / "tokenizer.model"))
    return run_prepare(tiny_config(corpus, out, tokenizer=tok, shard_tokens=4096, **overrides))


@pytest.fixture(scope="session")
def code_data(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A small source of other files than tiny_data's, with its tokenizer (`prepare_code`)."""
    return prepare_code(tmp_path_factory, tiny_data, "code_data")


@pytest.fixture(scope="session")
def other_tokenizer_data(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """`tiny_corpus` prepared with another tokenizer (vocab 384): the same text, ids that mean
    other pieces, for the checks that refuse a model and data that do not match."""
    out = tmp_path_factory.mktemp("other_tokenizer_data") / "data"
    return run_prepare(tiny_config(tiny_corpus, out, tokenizer=TokenizerConfig(vocab_size=384)))


# ---- independent views of a prepared dir, for checking what a loader yields


def shard_documents(data_dir: Path, name: str, masks: bool = False) -> list[np.ndarray]:
    """A shard's documents' tokens in stored order, read with tarfile (not through the loader);
    masks=True: their loss masks instead (all ones for a document without one)."""
    docs: list[np.ndarray] = []
    with tarfile.open(Path(data_dir) / name) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith(".tokens.u16"):
                tokens = np.frombuffer(data, "<u2")
                docs.append(np.ones(len(tokens), np.uint8) if masks else tokens)
            elif masks:
                assert m.name.endswith(".loss.u8")
                docs[-1] = np.frombuffer(data, np.uint8)
    return docs


def unit_stream(
    data_dir: Path, split: str, seed: int, epoch: int, shard: int, masks: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Shard `shard`'s stream in epoch `epoch` as the loader's docs define it (its documents in
    `doc_order`, concatenated; masks=True: their loss masks), and for each token the index of
    its document in the shard."""
    from pretrain.data.loader import doc_order

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    docs = shard_documents(data_dir, manifest["splits"][split]["shards"][shard]["name"], masks)
    order = doc_order(seed, epoch, shard, len(docs))
    return np.concatenate([docs[i] for i in order]), np.repeat(order, [len(docs[i]) for i in order])


def unit_windows(
    data_dir: Path,
    split: str,
    seed: int,
    epoch: int,
    shard: int,
    seq_len: int,
    masks: bool = False,
) -> np.ndarray:
    """[N, seq_len + 1]: shard `shard`'s windows in epoch `epoch` in the order the loader's docs
    lay them out: the stream cut into non-overlapping windows, taken in `window_order`."""
    from pretrain.data.loader import window_order

    flat, _ = unit_stream(data_dir, split, seed, epoch, shard, masks)
    n = len(flat) // (seq_len + 1)
    return flat[: n * (seq_len + 1)].reshape(n, seq_len + 1)[window_order(seed, epoch, shard, n)]


def epoch_layout(
    data_dir: Path, split: str, seed: int, epoch: int, seq_len: int, masks: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's layout as the loader's docs define it: every shard's windows, shards in
    `shard_order`; ([N, seq_len + 1] windows (or their masks), [N] the shard index of each)."""
    from pretrain.data.loader import shard_order

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    n = len(manifest["splits"][split]["shards"])
    parts = [
        (unit_windows(data_dir, split, seed, epoch, s, seq_len, masks), s)
        for s in shard_order(seed, epoch, n)
    ]
    return np.concatenate([w for w, _ in parts]), np.concatenate([[s] * len(w) for w, s in parts])


def global_stream(
    data_dir: Path,
    split: str,
    seed: int,
    epoch: int,
    seq_len: int,
    partitions: int,
    masks: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of the global stream as the loader's docs define it: the layout cut into
    `partitions` ranges of T windows, slot p reading range range_order[p], the slots interleaved
    window by window: ([P·T, seq_len + 1] windows (or their masks), [P·T] shard of each)."""
    from pretrain.data.loader import range_order

    layout, shard = epoch_layout(data_dir, split, seed, epoch, seq_len, masks)
    T = len(layout) // partitions
    i = np.arange(partitions * T)
    pos = range_order(seed, epoch, partitions)[i % partitions] * T + i // partitions
    return layout[pos], shard[pos]


def epoch_windows(
    data_dir: Path, split: str, seed: int, epoch: int, seq_len: int, partitions: int
) -> Counter[bytes]:
    """The windows one epoch of the loader reads (a multiset; the order is the loader's
    business): the epoch's layout without its last N mod partitions windows."""
    layout, _ = epoch_layout(data_dir, split, seed, epoch, seq_len)
    T = len(layout) // partitions
    return Counter(row.tobytes() for row in layout[: partitions * T])


def as_windows(x: Any, y: Any) -> np.ndarray:
    """Rebuild the [B, L + 1] uint16 windows of a batch (x, y) of plain text (no -1 targets)."""
    assert (x[:, 1:] == y[:, :-1]).all(), "y is not x shifted by one token"
    return np.concatenate([np.asarray(x), np.asarray(y[:, -1:])], axis=1).astype("<u2")


# ---- real corruption of a shard, in place (the file size never changes)


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.isfile()]


def flip_byte_in_member(path: Path) -> str:
    """Invert one byte in the middle of the data of the shard's middle member; returns the
    member's name. The tar stays a valid tar with the same size: only the hash can tell."""
    m = _members(path)[len(_members(path)) // 2]
    data = bytearray(path.read_bytes())
    data[m.offset_data + m.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return m.name


def replace_member_same_size(path: Path, donors: list[Path]) -> str:
    """Overwrite the data of the shard's smallest token member with as many bytes of another
    document's tokens (the first token member at least as long in `donors`, other shards);
    returns the member's name. The tar stays valid, its size and headers unchanged."""
    target = min(
        (m for m in _members(path) if m.name.endswith(".tokens.u16")), key=lambda m: m.size
    )
    other = None
    for donor in donors:
        with tarfile.open(donor) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".tokens.u16") and m.size >= target.size:
                    other = tar.extractfile(m).read()[: target.size]  # type: ignore[union-attr]
                    break
        if other is not None:
            break
    assert other is not None, "no donor document is long enough"
    data = bytearray(path.read_bytes())
    assert bytes(data[target.offset_data : target.offset_data + target.size]) != other
    data[target.offset_data : target.offset_data + target.size] = other
    path.write_bytes(bytes(data))
    return target.name
