"""Shards: the manifest of a prepared dataset, where its shards live, and reading them.

A data dir (see `pretrain.prepare`) is named by one of
    /path/to/dir  or  file:///path/to/dir      local files
    http://host/prefix  or  https://...         fetched with curl (via webdataset.gopen)
    pipe:COMMAND                                 a shell command that writes one file to stdout;
                                                 `{path}` in it is replaced by the file's path
                                                 relative to the data dir, e.g.
                                                 `pipe:aws s3 cp s3://bucket/prepared/{path} -`
pipe: runs a shell command, so it is refused unless the caller passes allow_pipe=True.

Integrity: local shards are checked against the manifest's sizes when a loader starts (cheap),
and against its sha256 when asked (`verify_sha256`). Every shard that is read, from anywhere, is
read whole and checked for its size (and sha256 when asked) before its tar is parsed; a tar that
does not parse, or holds other documents or token counts than the manifest says, raises a
ShardError naming the shard and what to do. Nothing is skipped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import webdataset as wds
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

MANIFEST = "manifest.json"
FORMAT = "pretrain-shards/1"


class DataError(RuntimeError):
    """A data dir, manifest or shard is not usable; the message says what to do."""


class ShardError(DataError):
    """A shard is missing, truncated or corrupt."""


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the data dir, e.g. "train/train-000003.tar"
    documents: int
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What `pretrain.prepare` wrote into manifest.json, typed."""

    source: str  # the data dir as given (a path or a URL)
    dtype: str  # "uint16" | "uint32"
    token_ext: str  # tar member extension of a document's tokens, e.g. "tokens.u16"
    tokenizer: str  # file name of the tokenizer inside the data dir
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int
    splits: dict[str, tuple[Shard, ...]]
    num_documents: dict[str, int]
    num_tokens: dict[str, int]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype("<u2" if self.dtype == "uint16" else "<u4")

    def shards(self, split: str) -> tuple[Shard, ...]:
        if split not in self.splits:
            raise DataError(
                f"split {split!r} is not in {self.source} (it has {sorted(self.splits)})."
            )
        return self.splits[split]

    def fingerprint(self, split: str) -> str:
        """Identifies the shards of a split (names and content hashes)."""
        h = hashlib.sha256(self.tokenizer_sha256.encode())
        for s in self.shards(split):
            h.update(f"{s.name}\0{s.sha256}\n".encode())
        return h.hexdigest()[:16]


def is_local(data_dir: str | Path) -> bool:
    return urlparse(str(data_dir)).scheme in ("", "file")


def local_path(data_dir: str | Path) -> Path:
    s = str(data_dir)
    return Path(url2pathname(urlparse(s).path)) if s.startswith("file:") else Path(s)


def resolve(data_dir: str | Path, relpath: str, *, allow_pipe: bool = False) -> str:
    """The URL (or local path) of `relpath` inside `data_dir`, for webdataset's gopen."""
    s = str(data_dir)
    scheme = urlparse(s).scheme
    if s.startswith("pipe:"):
        if not allow_pipe:
            raise DataError(
                f"data dir {s!r} is a pipe: command, which runs in a shell; pass allow_pipe=True "
                f"(config: data.allow_pipe=true) if you trust it."
            )
        if "{path}" not in s:
            raise DataError(
                f"pipe data dir {s!r} must contain {{path}}, which is replaced by each file's path "
                f"relative to the data dir, e.g. 'pipe:cat /data/prepared/{{path}}'."
            )
        return s.replace("{path}", relpath)
    if scheme in ("http", "https"):
        return s.rstrip("/") + "/" + relpath
    if scheme in ("", "file"):
        return str(local_path(s) / relpath)
    raise DataError(
        f"data dir {s!r} has an unsupported scheme {scheme!r}; use a local path, file://, "
        f"http(s):// or pipe:COMMAND."
    )


def fetch(url: str) -> bytes:
    """All bytes at a local path, file://, http(s):// or pipe: URL (errors propagate)."""
    stream = wds.gopen(url, "rb")
    try:
        return bytes(stream.read())
    finally:
        stream.close()


def read_manifest(data_dir: str | Path, *, allow_pipe: bool = False) -> Manifest:
    """Read and check `data_dir`/manifest.json."""
    src = str(data_dir)
    url = resolve(src, MANIFEST, allow_pipe=allow_pipe)
    if is_local(src):
        root = local_path(src)
        if not root.is_dir():
            raise DataError(
                f"data dir {src} does not exist; prepare one with "
                f"`python -m pretrain.prepare output={src}` or point the data dir at one."
            )
        if not (root / MANIFEST).is_file():
            hint = (
                "its prepare did not finish (the manifest is written last): run the same "
                "prepare command again to finish it"
                if any((root / d).is_dir() for d in ("train", "val"))
                else f"prepare one with `python -m pretrain.prepare output={src}`"
            )
            raise DataError(f"{src} has no {MANIFEST}: {hint}.")
    try:
        raw = json.loads(fetch(url))
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(
            f"{url} is not valid JSON ({exc}); the data dir is damaged: re-run prepare."
        ) from exc
    except Exception as exc:
        raise DataError(f"cannot read {url}: {exc}; check the data dir.") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise DataError(
            f"{url} has format {fmt!r}, this code reads {FORMAT!r}; re-run "
            f"`python -m pretrain.prepare` to rebuild the data dir."
        )
    try:
        splits = {
            name: tuple(Shard(**s) for s in split["shards"])
            for name, split in raw["splits"].items()
        }
        return Manifest(
            source=src,
            dtype=raw["dtype"],
            token_ext=raw["token_ext"],
            tokenizer=raw["tokenizer"],
            tokenizer_sha256=raw["tokenizer_sha256"],
            vocab_size=int(raw["vocab_size"]),
            eos_id=int(raw["eos_id"]),
            bos_id=int(raw["bos_id"]),
            pad_id=int(raw["pad_id"]),
            splits=splits,
            num_documents={k: int(v["num_documents"]) for k, v in raw["splits"].items()},
            num_tokens={k: int(v["num_tokens"]) for k, v in raw["splits"].items()},
            raw=raw,
        )
    except (KeyError, TypeError) as exc:
        raise DataError(f"{url} lacks field {exc}; re-run prepare to rebuild it.") from exc


def check_tokenizer(manifest: Manifest, expected_sha256: str) -> None:
    """Refuse shards tokenized with another tokenizer than the one training uses."""
    if expected_sha256 != manifest.tokenizer_sha256:
        raise DataError(
            f"tokenizer {expected_sha256[:12]} does not match the shards in {manifest.source} "
            f"(prepared with {manifest.tokenizer} sha256 {manifest.tokenizer_sha256[:12]}): "
            f"re-run prepare with tokenizer.path=<your tokenizer>, or point the data dir at "
            f"shards prepared with it (or train with {manifest.source}/{manifest.tokenizer})."
        )


def _redo(manifest: Manifest) -> str:
    return (
        f"re-copy the data dir or re-run `python -m pretrain.prepare output={manifest.source} "
        f"overwrite=true`"
    )


def check_local_shards(manifest: Manifest, split: str, *, verify_sha256: bool = False) -> None:
    """Every shard of `split` exists with the manifest's size (and sha256 when asked)."""
    root = local_path(manifest.source)
    for s in manifest.shards(split):
        path = root / s.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"shard {path} is missing: {_redo(manifest)}.") from None
        if size != s.bytes:
            raise ShardError(
                f"shard {path} has {size:,} bytes, the manifest says {s.bytes:,} (truncated or "
                f"replaced): {_redo(manifest)}."
            )
        if verify_sha256:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != s.sha256:
                raise ShardError(
                    f"shard {path} is corrupt (sha256 {h.hexdigest()[:12]}, the manifest says "
                    f"{s.sha256[:12]}): {_redo(manifest)}."
                )


def read_shard(
    manifest: Manifest, shard: Shard, *, allow_pipe: bool = False, verify_sha256: bool = False
) -> list[np.ndarray]:
    """The documents of `shard` in stored order, each a 1-D array of token ids ending in EOS."""
    url = resolve(manifest.source, shard.name, allow_pipe=allow_pipe)
    try:
        data = fetch(url)
    except Exception as exc:
        raise ShardError(
            f"cannot read shard {shard.name} from {url}: {exc}; {_redo(manifest)}."
        ) from exc
    if len(data) != shard.bytes:
        raise ShardError(
            f"shard {shard.name} from {url} has {len(data):,} bytes, the manifest says "
            f"{shard.bytes:,}: {_redo(manifest)}."
        )
    if verify_sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ShardError(
            f"shard {shard.name} from {url} is corrupt (sha256 mismatch): {_redo(manifest)}."
        )
    dtype, ext = manifest.np_dtype, manifest.token_ext
    docs: list[np.ndarray] = []
    try:
        # webdataset's own tar reader, with errors re-raised (its default would skip them).
        files = tar_file_expander(
            [{"url": url, "stream": io.BytesIO(data)}], handler=reraise_exception
        )
        for sample in group_by_keys(files, handler=reraise_exception):
            raw = sample.get(ext)
            if raw is None or len(raw) % dtype.itemsize:
                raise ValueError(f"sample {sample.get('__key__')!r} has no valid .{ext} member")
            docs.append(np.frombuffer(raw, dtype=dtype))
    except Exception as exc:
        raise ShardError(
            f"shard {shard.name} from {url} is corrupt ({type(exc).__name__}: {exc}); "
            f"{_redo(manifest)}."
        ) from exc
    ntok = sum(len(d) for d in docs)
    if len(docs) != shard.documents or ntok != shard.tokens:
        raise ShardError(
            f"shard {shard.name} from {url} is corrupt: it reads as {len(docs)} documents / "
            f"{ntok} tokens, the manifest says {shard.documents} / {shard.tokens} (a damaged tar "
            f"header ends a tar stream early): {_redo(manifest)}."
        )
    return docs
