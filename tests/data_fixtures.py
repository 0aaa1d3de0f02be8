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

from pretrain.prepare import PrepareConfig, TokenizerConfig, run_prepare, stdlib_files

# The tiny dataset: ~200 stdlib files, vocab 512, shards of ~16k tokens (>= 16 train shards, so
# 4 ranks x 2 workers have whole shards each), 5% validation (~10 one-document val shards).
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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A prepared data dir (tokenizer.model, train/, val/, manifest.json) of `tiny_corpus`."""
    out = tmp_path_factory.mktemp("tiny_data") / "data"
    return run_prepare(tiny_config(tiny_corpus, out))


@pytest.fixture(scope="session")
def other_tokenizer_data(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """`tiny_corpus` prepared with another tokenizer (vocab 384): the same text, ids that mean
    other pieces, for the checks that refuse a model and data that do not match."""
    out = tmp_path_factory.mktemp("other_tokenizer_data") / "data"
    return run_prepare(tiny_config(tiny_corpus, out, tokenizer=TokenizerConfig(vocab_size=384)))


# ---- independent views of a prepared dir, for checking what a loader yields


def shard_documents(data_dir: Path, name: str) -> list[np.ndarray]:
    """A shard's documents in stored order, read with tarfile (not through the loader)."""
    with tarfile.open(Path(data_dir) / name) as tar:
        return [np.frombuffer(tar.extractfile(m).read(), "<u2") for m in tar.getmembers()]  # type: ignore[union-attr]


def unit_stream(
    data_dir: Path, split: str, seed: int, epoch: int, shard: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shard `shard`'s stream in epoch `epoch` as the loader's docs define it (its documents in
    `doc_order`, concatenated), and for each token the index of its document in the shard."""
    from pretrain.data.loader import doc_order

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    docs = shard_documents(data_dir, manifest["splits"][split]["shards"][shard]["name"])
    order = doc_order(seed, epoch, shard, len(docs))
    return np.concatenate([docs[i] for i in order]), np.repeat(order, [len(docs[i]) for i in order])


def unit_windows(
    data_dir: Path, split: str, seed: int, epoch: int, shard: int, seq_len: int
) -> np.ndarray:
    """[N, seq_len + 1]: shard `shard`'s windows in epoch `epoch` in the order the loader's docs
    say it reads them: the stream cut into non-overlapping windows, taken in `window_order`."""
    from pretrain.data.loader import window_order

    flat, _ = unit_stream(data_dir, split, seed, epoch, shard)
    n = len(flat) // (seq_len + 1)
    return flat[: n * (seq_len + 1)].reshape(n, seq_len + 1)[window_order(seed, epoch, shard, n)]


def epoch_windows(
    data_dir: Path, split: str, seed: int, epoch: int, seq_len: int
) -> Counter[bytes]:
    """Every window of seq_len + 1 tokens of one epoch (a multiset: the order is the loader's
    business), each shard's stream cut into non-overlapping windows."""
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    out: Counter[bytes] = Counter()
    for s in range(len(manifest["splits"][split]["shards"])):
        out.update(row.tobytes() for row in unit_windows(data_dir, split, seed, epoch, s, seq_len))
    return out


def as_windows(x: Any, y: Any) -> np.ndarray:
    """Rebuild the [B, L + 1] uint16 windows of a batch (x, y)."""
    assert (x[:, 1:] == y[:, :-1]).all(), "y is not x shifted by one token"
    return np.concatenate([np.asarray(x), np.asarray(y[:, -1:])], axis=1).astype("<u2")
