"""The prepared-data format, defined once: `pretrain.prepare` writes it, `pretrain.data` reads it.

A prepared data dir holds

    tokenizer.model               the sentencepiece model the shards were tokenized with, or
    tokenizer/tokenizer.json ...  the Hugging Face tokenizer, with the config files that define
                                  its special tokens (`pretrain.tokenizer` stores both kinds)
    train/train-000000.tar ...    WebDataset shards (plain USTAR tars) of the train split
    val/val-000000.tar ...        ... and of the val split
    manifest.json                 written last; its presence is the only "done" marker

A shard holds whole documents, one WebDataset sample each, its members consecutive:

    <key>.tokens.u16  (.tokens.u32 when vocab_size > 65536)
        the document's token ids, raw little-endian: BOS first when the tokenizer adds one (an
        HF tokenizer whose post-processor does), the text, what the post-processor appends,
        EOS last
    <key>.loss.u8     (only for documents with tokens outside the loss: fine-tuning records)
        one byte per token: 1 = the token is a *response* token (the loss counts it when it is
        the target), 0 = a prompt token (never a target of the loss). Absent = all 1.

`key` is the document's index in input order ("%08d"). Tar members have fixed metadata
(mtime 0, uid/gid 0, mode 0644, USTAR), so equal inputs give byte-identical shards.

manifest.json (`Manifest`): the format string, token dtype and member extension, the tokenizer
(`tokenizer`: its place in the dir; its content hash `tokenizer_sha256`, the one
`pretrain.tokenizer` computes; special ids; vocab size, added tokens included), whether any
document has a loss mask, and per split the document and token counts and the list of shards
(name, documents, tokens, bytes, sha256). A Hugging Face tokenizer's manifest also has
`tokenizer_kind` ("hf") and `tokenizer_files` (its files, relative to the dir, so a remote data
dir's can be fetched); without them the tokenizer is the sentencepiece `tokenizer.model`, as in
every manifest written before. `bos_id` is the tokenizer's BOS token (sentencepiece's is never
added), -1 when it has none. The manifest also records what prepare skipped, its inputs, its
identity and config: readers ignore those.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pretrain.tokenizer import TextTokenizer, describe

FORMAT = "pretrain-shards/2"
# /1: the same members without loss masks (documents in input order); still read.
READABLE_FORMATS = ("pretrain-shards/1", FORMAT)
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
MASK_EXT = "loss.u8"


class DataError(RuntimeError):
    """A data dir, manifest or shard is not usable; the message says what to do."""


class ShardError(DataError):
    """A shard is missing, truncated or corrupt."""


def token_dtype(vocab_size: int) -> str:
    """The manifest's dtype name for token ids of a vocabulary this size."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def token_ext(dtype: str) -> str:
    """The tar member extension of a document's tokens for a manifest dtype."""
    return "tokens.u16" if dtype == "uint16" else "tokens.u32"


def np_dtype(dtype: str) -> np.dtype:
    return np.dtype("<u2" if dtype == "uint16" else "<u4")


def shard_name(split: str, index: int) -> str:
    """Path of a split's index-th shard, relative to the data dir."""
    return f"{split}/{split}-{index:06d}.tar"


def document_members(
    key: str, tokens: bytes, mask: bytes | None, ext: str
) -> list[tuple[str, bytes]]:
    """The tar members (name, bytes) of one document, in the order they are written."""
    members = [(f"{key}.{ext}", tokens)]
    if mask is not None:
        members.append((f"{key}.{MASK_EXT}", mask))
    return members


def tar_members(data: bytes) -> list[tuple[str, memoryview]]:
    """The (name, data) of every regular file in a USTAR tar, in order, without copying.

    The shards' own reader: a shard's bytes are checked against the manifest's sha256 before
    they are parsed, so this needs none of tarfile's generality (it is ~50x faster). Raises
    ValueError on bytes that are not such a tar."""
    view, off = memoryview(data), 0
    out: list[tuple[str, memoryview]] = []
    while off + 512 <= len(data):
        header = data[off : off + 512]
        if header.count(0) == 512:  # the end-of-archive blocks
            return out
        if header[257:262] != b"ustar":
            raise ValueError(f"no USTAR header at byte {off}")
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        start = off + 512
        if start + size > len(data):
            raise ValueError(f"member {name!r} runs past the end of the tar")
        if header[156:157] in (b"0", b"\0"):  # a regular file
            out.append((f"{prefix}/{name}" if prefix else name, view[start : start + size]))
        off = start + (size + 511) // 512 * 512
    raise ValueError("the tar has no end-of-archive blocks")


def shard_documents(
    data: bytes, ext: str, dtype: np.dtype
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The documents of a shard's bytes in stored order: (tokens [n], loss mask [n] or None).
    Raises ValueError when the bytes are not a shard of this format."""
    samples: list[dict[str, Any]] = []
    for name, member in tar_members(data):
        key, _, suffix = name.partition(".")
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        if suffix in samples[-1]:
            raise ValueError(f"{name}: a second .{suffix} member of sample {key!r}")
        samples[-1][suffix] = member
    return [document_arrays(sample, ext, dtype) for sample in samples]


def document_arrays(
    sample: dict[str, Any], ext: str, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens [n], loss mask [n] uint8 or None) of one WebDataset sample of a shard.
    Raises ValueError when the sample is not a document of this format."""
    raw = sample.get(ext)
    if raw is None or len(raw) % dtype.itemsize:
        raise ValueError(f"sample {sample.get('__key__')!r} has no valid .{ext} member")
    tokens = np.frombuffer(raw, dtype=dtype)
    mask_raw = sample.get(MASK_EXT)
    if mask_raw is None:
        return tokens, None
    mask = np.frombuffer(mask_raw, dtype=np.uint8)
    if len(mask) != len(tokens) or mask.max(initial=0) > 1:
        raise ValueError(f"sample {sample.get('__key__')!r} has a .{MASK_EXT} member that does "
                         f"not fit its {len(tokens)} tokens")  # fmt: skip
    return tokens, mask


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the data dir, e.g. "train/train-000003.tar"
    documents: int
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What manifest.json says, typed (`raw` keeps the whole JSON object)."""

    source: str  # the data dir as given (a path or a URL); not stored in the file
    dtype: str  # "uint16" | "uint32"
    token_ext: str  # tar member extension of a document's tokens, e.g. "tokens.u16"
    tokenizer: str  # where the tokenizer is inside the data dir (a file, or a directory)
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int
    splits: dict[str, tuple[Shard, ...]]
    num_documents: dict[str, int]
    num_tokens: dict[str, int]
    loss_mask: bool = False  # some document has a .loss.u8 member
    tokenizer_kind: str = "sentencepiece"  # "sentencepiece" | "hf"
    tokenizer_files: tuple[str, ...] = ()  # the tokenizer's files, relative to the data dir
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def np_dtype(self) -> np.dtype:
        return np_dtype(self.dtype)

    def shards(self, split: str) -> tuple[Shard, ...]:
        if split not in self.splits:
            raise DataError(
                f"split {split!r} is not in {self.source} (it has {sorted(self.splits)})."
            )
        return self.splits[split]

    def describe_tokenizer(self) -> str:
        """The data's tokenizer as messages name it (kind, path, hash prefix, size)."""
        return describe(
            self.tokenizer_kind,
            f"{self.source}/{self.tokenizer}",
            self.tokenizer_sha256,
            self.vocab_size,
        )

    def has(self, split: str) -> bool:
        """Whether the split holds any tokens (prepare writes an empty val split when it
        chose no val documents)."""
        return bool(self.splits.get(split)) and self.num_tokens.get(split, 1) > 0

    def fingerprint(self, split: str) -> str:
        """Identifies the shards of a split (names and content hashes)."""
        h = hashlib.sha256(self.tokenizer_sha256.encode())
        for s in self.shards(split):
            h.update(f"{s.name}\0{s.sha256}\n".encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_json(cls, raw: Any, source: str) -> Manifest:
        """Parse manifest.json's object; raises DataError naming what is wrong."""
        if not isinstance(raw, dict) or raw.get("format") not in READABLE_FORMATS:
            fmt = raw.get("format") if isinstance(raw, dict) else None
            raise DataError(
                f"{source}/{MANIFEST} has format {fmt!r}, this code reads {FORMAT!r}; re-run "
                f"`python -m pretrain.prepare` to rebuild the data dir."
            )
        try:
            splits = {
                name: tuple(Shard(**s) for s in split["shards"])
                for name, split in raw["splits"].items()
            }
            return cls(
                source=source,
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
                loss_mask=bool(raw.get("loss_mask", False)),
                tokenizer_kind=raw.get("tokenizer_kind", "sentencepiece"),
                tokenizer_files=tuple(raw.get("tokenizer_files") or [raw["tokenizer"]]),
                raw=raw,
            )
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"{source}/{MANIFEST} lacks field {exc}; re-run prepare to rebuild it."
            ) from exc


def tokenizer_fields(tokenizer: TextTokenizer) -> dict[str, Any]:
    """The manifest's fields about `tokenizer`, stored in the data dir with `tokenizer.save`."""
    fields = {
        "tokenizer": tokenizer.stored_name,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        **tokenizer.special_ids(),  # eos_id, bos_id, pad_id, unk_id
    }
    if tokenizer.kind != "sentencepiece":  # a sentencepiece manifest stays as it always was
        fields |= {"tokenizer_kind": tokenizer.kind, "tokenizer_files": tokenizer.stored_files()}
    return fields


def manifest_json(
    *,
    tokenizer: TextTokenizer,
    splits: dict[str, list[Shard]],
    loss_mask: bool,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest.json object of a finished prepare (`extra`: recorded, not read back)."""
    dtype = token_dtype(tokenizer.vocab_size)
    return {
        "format": FORMAT,
        "dtype": dtype,
        "token_ext": token_ext(dtype),
        **tokenizer_fields(tokenizer),
        "loss_mask": loss_mask,
        "num_documents": sum(s.documents for ss in splits.values() for s in ss),
        "num_tokens": sum(s.tokens for ss in splits.values() for s in ss),
        "splits": {
            split: {
                "num_documents": sum(s.documents for s in shards),
                "num_tokens": sum(s.tokens for s in shards),
                "shards": [asdict(s) for s in shards],
            }
            for split, shards in splits.items()
        },
        **extra,
    }
