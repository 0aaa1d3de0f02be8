"""Shards: where a prepared data dir lives, reading its manifest, and reading its shards.

A data dir (see `pretrain.prepare`; its format is `pretrain.data.format`) is named by one of
    /path/to/dir  or  file:///path/to/dir      local files
    http://host/prefix  or  https://...         fetched with curl (via webdataset.gopen)
    pipe:COMMAND                                 a shell command that writes one file to stdout;
                                                 `{path}` in it is replaced by the file's path
                                                 relative to the data dir, e.g.
                                                 `pipe:aws s3 cp s3://bucket/prepared/{path} -`
pipe: runs a shell command, so it is refused unless the caller passes allow_pipe=True.

Integrity, on every read: every shard that is read, from anywhere, is read whole and checked
against the manifest's size and sha256 before its tar is parsed, every time it is read, so a
flipped byte or a swapped member is never trained on. A tar that does not parse, or holds other
documents or token counts than the manifest says, raises a ShardError too. Each names the shard,
what was expected and found, and what to do. Before training, local shards are checked against
the manifest's sizes (cheap), and all of them against their sha256 when asked
(`verify_sha256`: a corrupt shard is found before the first step, not when it is reached).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import webdataset as wds

from pretrain.data.format import (
    MANIFEST,
    DataError,
    Manifest,
    Shard,
    ShardError,
    shard_documents,
)
from pretrain.tokenizer import (
    TextTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_from_contents,
)

__all__ = [
    "DataError",
    "Manifest",
    "Shard",
    "ShardError",
    "data_tokenizer",
    "read_manifest",
    "read_shard",
]


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
    except ValueError as exc:
        raise DataError(
            f"{url} is not valid JSON ({exc}); the data dir is damaged: re-run prepare."
        ) from exc
    except Exception as exc:
        raise DataError(f"cannot read {url}: {exc}; check the data dir.") from exc
    return Manifest.from_json(raw, src)


def data_tokenizer(manifest: Manifest, *, allow_pipe: bool = False) -> TextTokenizer:
    """The tokenizer a data dir was prepared with (fetched from a remote one), checked against
    the manifest's hash."""
    src = manifest.source
    where = f"{src}/{manifest.tokenizer}"
    try:
        if is_local(src):
            tok = load_tokenizer(local_path(src) / manifest.tokenizer)
        else:
            contents = {
                Path(rel).name: fetch(resolve(src, rel, allow_pipe=allow_pipe))
                for rel in manifest.tokenizer_files
            }
            tok = tokenizer_from_contents(manifest.tokenizer_kind, contents, where)
    except (TokenizerError, OSError) as exc:
        raise DataError(f"cannot read the tokenizer of {src}: {exc}; {_redo(manifest)}.") from exc
    if tok.sha256 != manifest.tokenizer_sha256:
        raise DataError(
            f"the tokenizer in {where} has sha256 {tok.sha256[:12]}, the manifest says "
            f"{manifest.tokenizer_sha256[:12]}: it is not the one the shards were prepared with; "
            f"{_redo(manifest)}."
        )
    return tok


def check_tokenizer(manifest: Manifest, expected_sha256: str) -> None:
    """Refuse shards tokenized with another tokenizer than the one training uses."""
    if expected_sha256 != manifest.tokenizer_sha256:
        data = manifest.describe_tokenizer()
        raise DataError(
            f"tokenizer {expected_sha256[:12]} does not match the shards in {manifest.source} "
            f"(prepared with {data}): re-run prepare with "
            f"tokenizer.path=<your tokenizer>, or point the data dir at shards prepared with it."
        )


def _redo(manifest: Manifest) -> str:
    return (
        f"re-copy the data dir from where it came from, or re-run `python -m pretrain.prepare "
        f"output={manifest.source} overwrite=true` with the inputs it was prepared from"
    )


def _corrupt(manifest: Manifest, shard: Shard, where: str, found: str) -> ShardError:
    return ShardError(
        f"shard {shard.name} ({where}) is corrupt: its sha256 is {found}, the manifest says "
        f"{shard.sha256}; stopped before training on it. To fix it: {_redo(manifest)}."
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
                raise _corrupt(manifest, s, str(path), h.hexdigest())


Document = tuple[np.ndarray, "np.ndarray | None"]  # (tokens [n], loss mask [n] uint8 or None)


def read_shard(
    manifest: Manifest, shard: Shard, *, allow_pipe: bool = False, check_sha256: bool = True
) -> list[Document]:
    """The documents of `shard` in stored order: (tokens ending in EOS, loss mask or None).

    The bytes are checked against the manifest's size and sha256 first (check_sha256=False is
    for measuring what the check costs, nothing else)."""
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
    if check_sha256:
        found = hashlib.sha256(data).hexdigest()
        if found != shard.sha256:
            raise _corrupt(manifest, shard, url, found)
    try:
        docs = shard_documents(data, manifest.token_ext, manifest.np_dtype)
    except Exception as exc:
        raise ShardError(
            f"shard {shard.name} from {url} is corrupt ({type(exc).__name__}: {exc}); "
            f"{_redo(manifest)}."
        ) from exc
    ntok = sum(len(d[0]) for d in docs)
    if len(docs) != shard.documents or ntok != shard.tokens:
        raise ShardError(
            f"shard {shard.name} from {url} is corrupt: it reads as {len(docs)} documents / "
            f"{ntok} tokens, the manifest says {shard.documents} / {shard.tokens} (a damaged tar "
            f"header ends a tar stream early): {_redo(manifest)}."
        )
    return docs
