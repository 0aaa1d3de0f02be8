"""Prepare a corpus for training: documents → tokenizer → WebDataset token shards + manifest.

    python -m pretrain.prepare output=data/stdlib                     # the embedded corpus
    python -m pretrain.prepare 'input=[corpus/*.jsonl.gz,notes/**/*.txt]' output=data/mine \
        tokenizer.vocab_size=16384

What a document is
    * `.txt` and `.py` files: the whole file is one document.
    * `.jsonl` and `.jsonl.gz` files: each non-blank line is a JSON object whose string field
      `text` is one document.
    Text is the file's bytes decoded as strict UTF-8, nothing else: no newline translation, no
    Unicode normalisation, a byte-order mark stays a character. Documents that are empty, not
    valid UTF-8, or contain NUL characters (binary junk) are skipped and counted; so are
    unreadable files, invalid JSON lines and lines without a string `text`. The counts, with a
    few examples each, are printed and written to the manifest.
    The default input, `stdlib`, is every `.py` file of the running Python's standard library
    (`sysconfig.get_paths()["stdlib"]`, without site-packages): a corpus that is always there.

What it writes into `output` (and nothing else)
    tokenizer.model               sentencepiece BPE (trained here, or copied from tokenizer.path)
    train/train-000000.tar ...    WebDataset shards; one sample per document: key "%08d" (the
    val/val-000000.tar ...        document's index in input order), member "<key>.tokens.u16"
                                  (or .tokens.u32 when vocab_size > 65536) holding the raw
                                  little-endian token ids of the document followed by EOS.
    manifest.json                 written last; its presence is the only "done" marker.
    Token count of a document = len(sp.encode(text)) + 1 (the EOS), with plain sentencepiece and
    the written tokenizer.model; the manifest's counts are exact sums of that.

Tokenizer: sentencepiece BPE with byte fallback (see pretrain.tokenizer), trained on at most
`tokenizer.sample_bytes` of text: whole files in a seeded order of their paths relative to the
inputs' common directory, cut at line ends into pieces of at most `max_sentence_bytes`.

Splits: a document goes to val when a seeded hash of its *content* falls below `val_fraction`, so
identical documents always land on the same side and the split does not depend on file names or
on the machine. If that leaves val (or train) empty while there are at least two documents, the
document with the smallest (largest) hash is moved across, so both splits are never empty.

Shards: documents are kept whole and in input order; a shard is closed before the document that
would take it over `shard_tokens` (a single longer document gets a shard of its own). Val shards
use `val_shard_tokens` (default shard_tokens × val_fraction) so that val has about as many
shards as train and can be split over as many ranks and workers.

Deterministic: inputs are sorted, tokenization results are consumed in input order whatever
`num_proc` is, tar members have fixed metadata (mtime 0, uid/gid 0, mode 0644, USTAR) and the
manifest holds no timestamps: the same inputs and config give byte-identical shards and
tokenizer, and manifests that differ at most in the num_proc and output they record.

Atomic and restartable: every file is written to a hidden temp name, fsynced, then renamed; the
manifest goes last. An interrupted prepare leaves no manifest, so nothing reads its shards; running
the same command again redoes the work from scratch (it deletes this app's leftovers: shards,
temp files and tokenizer.model). Running it over a finished prepare with the same config and
inputs does nothing; with a different one it refuses unless `overwrite=true`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import sysconfig
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from tqdm import tqdm

from pretrain.tokenizer import (
    EOS_ID,
    Tokenizer,
    TokenizerTrainingError,
    file_sha256,
    train_tokenizer,
    write_atomic,
)

STDLIB = "stdlib"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT = "pretrain-shards/1"
SPLITS = ("train", "val")
SUPPORTED = (".txt", ".py", ".jsonl", ".jsonl.gz")
JSONL_CHUNK_BYTES = 8 << 20  # plain .jsonl files are tokenized in chunks this big, in parallel
MAX_EXAMPLES = 5  # skipped-input examples kept per reason


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    """Number of sentencepiece pieces (256 byte pieces and 4 special ids included)."""
    path: str | None = None
    """An existing sentencepiece .model to use instead of training one (copied into output)."""
    sample_bytes: int = 10_000_000
    """Upper bound on the UTF-8 bytes of text the tokenizer is trained on (a seeded sample)."""
    max_sentence_bytes: int = 4096
    """Documents are cut at line ends into training pieces of at most this many bytes."""
    num_threads: int = 1
    """sentencepiece trainer threads (recorded in the model, so fixed for reproducibility)."""


@dataclass
class PrepareConfig:
    input: Any = STDLIB
    """A glob, a directory, or a list of them; `stdlib` = the running Python's standard library."""
    output: str = MISSING
    """Directory that receives tokenizer.model, train/, val/ and manifest.json."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """How the tokenizer is trained (or which one is reused)."""
    shard_tokens: int = 1 << 19
    """Soft upper bound on the tokens of a train shard (documents are never split)."""
    val_fraction: float = 0.005
    """Expected fraction of documents that go to the val split (0 = no val split)."""
    val_shard_tokens: int | None = None
    """Upper bound on the tokens of a val shard; default shard_tokens × val_fraction."""
    seed: int = 0
    """Seeds the train/val assignment and the tokenizer's training sample."""
    num_proc: int = 0
    """Tokenizer processes; 0 = every CPU this process may use."""
    overwrite: bool = False
    """Replace a finished prepare in `output` that was made with other inputs or settings."""


ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)
# The app writes only into `output`: no Hydra run directory, no .hydra/ subdir, no log files.
ConfigStore.instance().store(
    name="prepare",
    node={
        "defaults": [
            "prepare_schema",
            {"override hydra/job_logging": "disabled"},
            {"override hydra/hydra_logging": "disabled"},
            "_self_",
        ],
        "hydra": {"run": {"dir": "."}, "output_subdir": None, "job": {"chdir": False}},
    },
)


class PrepareError(RuntimeError):
    """A problem with the inputs or the output directory, phrased as what to do about it."""


# --------------------------------------------------------------------------------------------
# Inputs: files → work units → documents


@dataclass(frozen=True)
class Unit:
    """A piece of work for one tokenizer process: a whole file, or a byte range of a .jsonl."""

    path: str
    kind: str  # "text" | "jsonl" | "jsonl.gz"
    start: int = 0
    end: int = -1  # -1: to the end of the file


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    skip = {"site-packages", "dist-packages"}
    return [f for f in files if not skip & set(Path(f).relative_to(root).parts)]


def _as_list(spec: Any) -> list[str]:
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
    for pattern in _as_list(spec):
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


def _decode(data: bytes) -> tuple[str | None, str | None]:
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    reason = _check_text(text)
    return (None, reason) if reason else (text, None)


def _jsonl_line(line: bytes) -> tuple[str | None, str | None]:
    try:
        obj = json.loads(line.decode("utf-8", errors="strict"))
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except ValueError:
        return None, "invalid_json"
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return None, "no_text"
    try:  # JSON escapes can smuggle in lone surrogates, which are not UTF-8
        text.encode("utf-8", errors="strict")
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    reason = _check_text(text)
    return (None, reason) if reason else (text, None)


def iter_unit_docs(unit: Unit) -> Iterator[tuple[str | None, str | None, str]]:
    """Yield (text, None, where) per document and (None, reason, where) per skipped one.

    Raises OSError/EOFError/zlib errors when the file cannot be read; callers treat the whole
    unit as unreadable then (so a damaged .gz never contributes half its documents)."""
    if unit.kind == "text":
        with open(unit.path, "rb") as f:
            text, reason = _decode(f.read())
        yield text, reason, unit.path
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
            text, reason = _jsonl_line(line)
            where = f"{unit.path}@{pos}" if unit.kind == "jsonl" else f"{unit.path}:{lineno}"
            yield text, reason, where


def doc_hash(text_utf8: bytes, seed: int) -> int:
    """A seeded 64-bit hash of a document's content (decides its split)."""
    return int.from_bytes(
        hashlib.blake2b(text_utf8, digest_size=8, key=str(seed).encode()).digest(), "little"
    )


# --------------------------------------------------------------------------------------------
# Tokenization (runs in worker processes, or inline when num_proc == 1)

_SP: Any = None
_DTYPE: Any = None
_SEED = 0


def _init_worker(model_path: str, dtype: str, seed: int) -> None:
    import sentencepiece as spm

    global _SP, _DTYPE, _SEED
    _SP = spm.SentencePieceProcessor(model_file=model_path)
    _DTYPE, _SEED = np.dtype(dtype), seed


@dataclass
class UnitResult:
    docs: list[tuple[bytes, int, int]]  # (token bytes incl. EOS, n_tokens, content hash)
    skipped: list[tuple[str, str]]  # (reason, where)
    unreadable: str | None = None  # why the unit could not be read at all


def _encode_unit(unit: Unit) -> UnitResult:
    docs, skipped = [], []
    try:
        for text, reason, where in iter_unit_docs(unit):
            if text is None:
                skipped.append((str(reason), where))
                continue
            ids = _SP.encode(text)
            ids.append(EOS_ID)
            docs.append(
                (np.asarray(ids, dtype=_DTYPE).tobytes(), len(ids), doc_hash(text.encode(), _SEED))
            )
    except (OSError, EOFError, ValueError) as exc:  # ValueError: zlib/gzip damage
        return UnitResult([], [], f"{type(exc).__name__}: {exc}")
    return UnitResult(docs, skipped)


# --------------------------------------------------------------------------------------------
# Shard writing


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:  # tarfile asks where it starts
        return self.nbytes

    def write(self, b: Any) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.nbytes += len(b)
        return len(b)


@dataclass
class ShardRecord:
    name: str  # relative to the output dir, e.g. "train/train-000003.tar"
    documents: int
    tokens: int
    bytes: int
    sha256: str


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: identical inputs give byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes one split's documents into size-bounded tar shards, each atomically."""

    def __init__(self, out: Path, split: str, max_tokens: int, ext: str) -> None:
        self.out, self.split, self.max_tokens, self.ext = out, split, max_tokens, ext
        self.records: list[ShardRecord] = []
        self._tar: tarfile.TarFile | None = None
        (out / split).mkdir(parents=True, exist_ok=True)

    def add(self, key: str, data: bytes, ntokens: int) -> str:
        if self._tar is not None and self._tokens + ntokens > self.max_tokens:
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.addfile(_tarinfo(f"{key}.{self.ext}", len(data)), io.BytesIO(data))  # type: ignore[union-attr]
        self._docs += 1
        self._tokens += ntokens
        return self._name

    def close(self) -> list[ShardRecord]:
        if self._tar is not None:
            self._finish()
        return self.records

    def abort(self) -> None:
        """Drop the shard being written (its temp file); finished shards stay."""
        if self._tar is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def _open(self) -> None:
        index = len(self.records)
        self._name = f"{self.split}/{self.split}-{index:06d}.tar"
        self._tmp = self.out / self.split / f".{self.split}-{index:06d}.tar.tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - lives until _finish/abort
        self._hw = _HashingWriter(self._file)
        self._tar = tarfile.open(  # noqa: SIM115 - closed in _finish
            fileobj=self._hw,  # type: ignore[call-overload]
            mode="w",
            format=tarfile.USTAR_FORMAT,
        )
        self._docs = self._tokens = 0

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.out / self._name)
        self.records.append(
            ShardRecord(
                self._name, self._docs, self._tokens, self._hw.nbytes, self._hw.sha.hexdigest()
            )
        )
        self._tar = None


def _rewrite_without(
    out: Path, rec: ShardRecord, key: str, ext: str
) -> tuple[bytes, ShardRecord | None]:
    """Remove document `key` from a finished shard (atomically); returns its token bytes and
    the shard's new record (None when the shard became empty and was deleted)."""
    with tarfile.open(out / rec.name) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    taken = next(data for name, data in members if name == f"{key}.{ext}")
    kept = [(name, data) for name, data in members if name != f"{key}.{ext}"]
    if not kept:
        (out / rec.name).unlink()
        return taken, None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in kept:
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    write_atomic(out / rec.name, buf.getvalue())
    itemsize = 2 if ext.endswith("u16") else 4
    new = ShardRecord(
        rec.name,
        rec.documents - 1,
        rec.tokens - len(taken) // itemsize,
        len(buf.getvalue()),
        hashlib.sha256(buf.getvalue()).hexdigest(),
    )
    return taken, new


# --------------------------------------------------------------------------------------------
# The run


class _Skips:
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


def _num_proc(n: int) -> int:
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _identity(cfg: PrepareConfig, files: list[str], tok_sha: str | None) -> dict[str, Any]:
    """Everything that determines the output; two prepares with equal identities agree."""
    conf = dataclasses.asdict(cfg)
    for k in ("input", "output", "num_proc", "overwrite"):  # inputs count by the files they match
        conf.pop(k)
    if tok_sha is not None:
        conf["tokenizer"] = {"path_sha256": tok_sha}
    listing = hashlib.sha256()
    for f in files:
        listing.update(f"{f}\0{os.path.getsize(f)}\n".encode())
    return {"config": conf, "num_files": len(files), "files_sha256": listing.hexdigest()}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


def _clean_leftovers(out: Path) -> None:
    """Delete what an earlier (interrupted or replaced) prepare left here; only our own names."""
    (out / MANIFEST).unlink(missing_ok=True)  # first: the directory must never look finished
    for split in SPLITS:
        d = out / split
        if d.is_dir():
            for p in d.iterdir():
                if fnmatch.fnmatch(p.name, f"{split}-*.tar") or fnmatch.fnmatch(p.name, ".*.tmp"):
                    p.unlink()
    for p in out.glob(".*.tmp"):
        p.unlink()
    (out / TOKENIZER_FILE).unlink(missing_ok=True)


def _training_sample(units: list[Unit], cfg: PrepareConfig, skips: _Skips) -> Iterator[str]:
    """A bounded, deterministic sample of text for the tokenizer: whole files in seeded-hash
    order, each document cut at line ends into pieces of at most max_sentence_bytes."""
    tc = cfg.tokenizer
    # Hash paths relative to the inputs' common directory: the sample (so the tokenizer) stays
    # the same when the corpus is moved or is another install's copy of the stdlib.
    base = os.path.commonpath([u.path for u in units]) if len(units) > 1 else ""
    order = sorted(
        units,
        key=lambda u: doc_hash(
            f"{os.path.relpath(u.path, base or None)}:{u.start}".encode(), cfg.seed
        ),
    )
    budget = tc.sample_bytes
    for unit in order:
        try:
            for text, reason, where in iter_unit_docs(unit):
                if text is None:
                    skips.add(str(reason), where)
                    continue
                for piece in _pieces(text, tc.max_sentence_bytes):
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


def _validate(cfg: PrepareConfig) -> None:
    if cfg.output in (None, "", MISSING):
        raise PrepareError("output is required: e.g. output=data/stdlib")
    if cfg.shard_tokens < 1:
        raise PrepareError(f"shard_tokens={cfg.shard_tokens} must be >= 1 (e.g. 1048576).")
    if cfg.val_shard_tokens is not None and cfg.val_shard_tokens < 1:
        raise PrepareError(f"val_shard_tokens={cfg.val_shard_tokens} must be >= 1 or null.")
    if not 0.0 <= cfg.val_fraction <= 0.5:
        raise PrepareError(f"val_fraction={cfg.val_fraction} must be in [0, 0.5] (e.g. 0.005).")
    if cfg.num_proc < 0:
        raise PrepareError(f"num_proc={cfg.num_proc} must be >= 0 (0 = all CPUs).")
    if cfg.tokenizer.path is None and cfg.tokenizer.sample_bytes < 1:
        raise PrepareError("tokenizer.sample_bytes must be >= 1.")


def run_prepare(cfg: PrepareConfig) -> Path:
    """Prepare `cfg.input` into `cfg.output` (see the module docstring); returns the output dir.

    Raises PrepareError with a message that says what to do when the inputs or the output
    directory are not usable."""
    # Imported here: tokenizer worker processes import this module and need no torch.
    from pretrain.dist import is_main

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    _validate(cfg)
    t0 = time.perf_counter()
    out = Path(cfg.output)
    say = print if is_main() else (lambda *a, **k: None)

    files, unsupported = resolve_inputs(cfg.input)
    skips = _Skips()
    for f in unsupported:
        skips.add("unsupported", f)
    if not files:
        raise PrepareError(
            f"input={cfg.input!r} matched {len(unsupported)} file(s) but none of a supported type "
            f"({', '.join(SUPPORTED)}); point input at such files."
        )
    units = make_units(files)

    # Reuse a given tokenizer (read now: cleaning the output may delete the file it names).
    given_model: bytes | None = None
    if cfg.tokenizer.path is not None:
        try:
            given = Tokenizer(cfg.tokenizer.path)
        except Exception as exc:
            raise PrepareError(
                f"tokenizer.path={cfg.tokenizer.path!r} is not a readable sentencepiece model "
                f"({exc}); pass a .model file or drop tokenizer.path to train one."
            ) from exc
        if given.eos_id < 0:
            raise PrepareError(f"tokenizer {cfg.tokenizer.path} has no EOS id; train one here.")
        given_model = given.path.read_bytes()
    identity = _identity(
        cfg, files, file_sha256(cfg.tokenizer.path) if cfg.tokenizer.path is not None else None
    )

    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        diffs = [
            "the input files or their sizes changed" if d.startswith("files_sha256:") else d
            for d in _differences(old.get("identity", {}), identity)
        ]
        if not diffs:
            say(f"{out} already holds this prepare ({manifest_path}); nothing to do.")
            return out
        if not cfg.overwrite:
            raise PrepareError(
                f"{out} already holds a different prepare:\n  "
                + "\n  ".join(diffs[:10])
                + "\nPass overwrite=true to replace it, or choose another output directory."
            )

    # 1. The tokenizer: trained on a bounded seeded sample, or the given one.
    if given_model is None:
        say(
            f"training a {cfg.tokenizer.vocab_size}-piece BPE tokenizer on <= {cfg.tokenizer.sample_bytes:,} bytes"
        )
        sample_skips = _Skips()
        sample = list(_training_sample(units, cfg, sample_skips))
        if not sample:
            raise PrepareError(
                f"no usable documents in {len(files)} input file(s) (skipped: "
                f"{sample_skips.summary()}); every file is empty, unreadable or not UTF-8 text."
            )
        out.mkdir(parents=True, exist_ok=True)
        tmp_model = out / ".tokenizer.train.tmp"
        try:
            train_tokenizer(
                sample,
                cfg.tokenizer.vocab_size,
                tmp_model,
                num_threads=cfg.tokenizer.num_threads,
                max_sentence_bytes=cfg.tokenizer.max_sentence_bytes,
            )
            model_bytes = tmp_model.read_bytes()
        except TokenizerTrainingError as exc:
            raise PrepareError(str(exc)) from exc
        finally:
            tmp_model.unlink(missing_ok=True)
        del sample
    else:
        model_bytes = given_model

    # 2. Output directory: clear this app's leftovers, then the tokenizer.
    out.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out)
    write_atomic(out / TOKENIZER_FILE, model_bytes)
    tok = Tokenizer(out / TOKENIZER_FILE)
    dtype = "<u2" if tok.vocab_size <= 1 << 16 else "<u4"
    ext = "tokens.u16" if dtype == "<u2" else "tokens.u32"

    # 3. Tokenize every unit in parallel; consume results in input order and shard them.
    num_proc = min(_num_proc(cfg.num_proc), len(units))
    val_shard_tokens = cfg.val_shard_tokens or max(1, int(cfg.shard_tokens * cfg.val_fraction))
    writers = {
        "train": ShardWriter(out, "train", cfg.shard_tokens, ext),
        "val": ShardWriter(out, "val", val_shard_tokens, ext),
    }
    threshold = int(cfg.val_fraction * 2**64)
    # The extreme-hash documents of each split, in case the other split ends up empty.
    extreme: dict[str, tuple[int, str, str] | None] = {"train": None, "val": None}
    unreadable: set[str] = set()
    n_docs = n_tokens = 0
    tty = sys.stderr.isatty()
    try:
        # The pool starts before the progress bar's monitor thread exists.
        with _results(units, str(out / TOKENIZER_FILE), dtype, cfg.seed, num_proc) as results:
            bar = tqdm(
                total=len(units),
                unit="file",
                desc="tokenize",
                disable=not is_main(),
                mininterval=0.2 if tty else 15.0,
                dynamic_ncols=True,
            )
            for unit, res in zip(units, results):
                bar.update(1)
                if res.unreadable is not None:
                    if unit.path not in unreadable:
                        unreadable.add(unit.path)
                        skips.add("unreadable", f"{unit.path} ({res.unreadable})")
                    continue
                for reason, where in res.skipped:
                    skips.add(reason, where)
                for data, ntok, h in res.docs:
                    key = f"{n_docs:08d}"
                    split = "val" if h < threshold else "train"
                    shard = writers[split].add(key, data, ntok)
                    cur = extreme[split]
                    if split == "train" and (cur is None or h < cur[0]):
                        extreme["train"] = (h, key, shard)
                    if split == "val" and (cur is None or h > cur[0]):
                        extreme["val"] = (h, key, shard)
                    n_docs += 1
                    n_tokens += ntok
                bar.set_postfix(docs=n_docs, tokens=n_tokens, refresh=False)
            bar.close()
        records = {split: w.close() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    if n_docs == 0:
        _clean_leftovers(out)
        raise PrepareError(
            f"no usable documents in {len(files)} input file(s) (skipped: {skips.summary()}); "
            f"every document is empty, unreadable or not UTF-8 text."
        )
    # Both splits non-empty whenever there are two documents (val only if asked for).
    if n_docs >= 2 and cfg.val_fraction > 0:
        for src, dst in (("train", "val"), ("val", "train")):
            if not records[dst] and extreme[src] is not None:
                _, key, shard = extreme[src]  # type: ignore[misc]
                i = next(i for i, r in enumerate(records[src]) if r.name == shard)
                data, new = _rewrite_without(out, records[src][i], key, ext)
                records[src][i : i + 1] = [new] if new else []
                w = ShardWriter(out, dst, 1 << 62, ext)
                w.add(key, data, len(data) // np.dtype(dtype).itemsize)
                records[dst] = w.close()
    _fsync_dir(out / "train")
    _fsync_dir(out / "val")

    # 4. The manifest, last.
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "dtype": "uint16" if dtype == "<u2" else "uint32",
        "token_ext": ext,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
        "num_documents": n_docs,
        "num_tokens": n_tokens,
        "splits": {
            split: {
                "num_documents": sum(r.documents for r in records[split]),
                "num_tokens": sum(r.tokens for r in records[split]),
                "shards": [dataclasses.asdict(r) for r in records[split]],
            }
            for split in SPLITS
        },
        "skipped": skips.as_dict(),
        "inputs": {"num_files": len(files), "roots": _roots(cfg.input)},
        "identity": identity,
        "config": dataclasses.asdict(cfg) | {"num_proc": num_proc},
    }
    write_atomic(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    _fsync_dir(out)

    dt = time.perf_counter() - t0
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    say(
        f"prepared {n_docs:,} documents, {n_tokens:,} tokens from {len(files):,} files in {dt:.1f}s "
        f"({n_tokens / dt:,.0f} tokens/s, {num_proc} processes)\n"
        f"  train: {tr['num_documents']:,} docs, {tr['num_tokens']:,} tokens, {len(tr['shards'])} shards\n"
        f"  val:   {va['num_documents']:,} docs, {va['num_tokens']:,} tokens, {len(va['shards'])} shards\n"
        f"  skipped inputs: {skips.summary()}\n"
        f"  -> {manifest_path}"
    )
    for reason, entry in skips.as_dict().items():
        say(f"  skipped {entry['count']} ({reason}), e.g. " + ", ".join(entry["examples"][:3]))
    return out


def _roots(spec: Any) -> list[str]:
    return [sysconfig.get_paths()["stdlib"] if s == STDLIB else s for s in _as_list(spec)]


def _fsync_dir(path: Path) -> None:
    if not path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _results:
    """Context manager yielding UnitResults in input order, from a process pool or inline."""

    def __init__(self, units: list[Unit], model: str, dtype: str, seed: int, num_proc: int) -> None:
        self.units, self.args, self.num_proc = units, (model, dtype, seed), num_proc
        self.pool: Any = None

    def __enter__(self) -> Iterable[UnitResult]:
        if self.num_proc <= 1:
            _init_worker(*self.args)
            return map(_encode_unit, self.units)
        # fork where there is one (as torch's DataLoader does): workers start in milliseconds and
        # run only sentencepiece and numpy, never torch, so a forked torch runtime is harmless.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.pool = mp.get_context(method).Pool(
            self.num_proc, initializer=_init_worker, initargs=self.args
        )
        chunk = max(1, min(8, len(self.units) // (8 * self.num_proc)))
        return self.pool.imap(_encode_unit, self.units, chunksize=chunk)

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


@hydra.main(config_path=None, config_name="prepare", version_base=None)
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "output"):
        sys.exit("prepare: error: output=<dir> is required, e.g. output=data/stdlib")
    try:
        run_prepare(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except PrepareError as exc:
        sys.exit(f"prepare: error: {exc}")


if __name__ == "__main__":
    main()
