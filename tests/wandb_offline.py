"""Reader for the run files W&B writes in offline mode (`wandb/offline-run-*/run-<id>.wandb`).

wandb 0.31 ships no public Python reader for these files, so tests that check what a training run
logged read them here. The format, as written by wandb-core's `core/pkg/leveldb` writer:

* a 7-byte file header: b":W&B", a little-endian uint16 magic 0xBEE1, a version byte (0);
* then LevelDB-log framing in 32 KiB blocks (block 0 starts at file offset 0, so the file header
  occupies its first 7 bytes). Each chunk has a 7-byte header: CRC (uint32 LE), payload length
  (uint16 LE), chunk type (1 full, 2 first, 3 middle, 4 last). A block tail shorter than a chunk
  header is zero padding. The CRC is the plain IEEE CRC-32 (`zlib.crc32`) of the type byte
  followed by the payload: wandb-core opens its log with `CRCAlgoIEEE`, not LevelDB's masked
  CRC-32C;
* every reassembled record is a serialized `wandb.proto.wandb_internal_pb2.Record`.

A history item names its key either by `key` or by the path `nested_key` (a logged
`{"a": {"b": 1}}` becomes nested_key ["a", "b"]); its value is JSON text in `value_json` (NaN and
+-Infinity spelled as in JavaScript, which `json.loads` accepts) or one of the typed fields of the
`value` oneof.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version: 7 bytes
CHUNK_HEADER = struct.Struct("<IHB")  # crc, payload length, chunk type: 7 bytes
BLOCK_SIZE = 32 * 1024
# wandb generates its protobuf modules per protobuf major version, without type stubs.
Record: Any = pb.Record  # type: ignore[attr-defined]
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

# offline-run-<YYYYMMDD_HHMMSS>-<id>[-<n>]: wandb appends -1, -2, ... when a run directory with
# the same second and id already exists (a fast resume), so order by (time, n), not by name.
_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


class WandbFileError(ValueError):
    """A `.wandb` file is not a W&B run file, or is corrupt before its last record."""


def _split_records(data: bytes, path: Path) -> list[bytes]:
    """Reassemble the payloads of all complete records. A record cut short at the end of the
    file (the writer was killed mid-record) is dropped; any other inconsistency raises."""
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes, too short for the W&B file header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise WandbFileError(
            f"{path}: not a W&B run file (header {data[:7]!r}, expected {FILE_IDENT!r} + magic "
            f"0x{FILE_MAGIC:X})"
        )
    if version != 0:
        raise WandbFileError(f"{path}: W&B file version {version}; this reader knows version 0")

    records: list[bytes] = []
    parts: list[bytes] | None = None  # chunks of a record being reassembled
    pos = FILE_HEADER.size
    while pos < len(data):
        room = BLOCK_SIZE - pos % BLOCK_SIZE
        if room < CHUNK_HEADER.size:  # block tail too short for a header: padding
            pos += room
            continue
        if pos + CHUNK_HEADER.size > len(data):
            break  # header cut short at end of file
        crc, length, ctype = CHUNK_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and ctype == 0:
            # A zeroed rest of block (preallocated/mmapped file): skip to the next block, as
            # wandb-core's reader does.
            pos += room
            continue
        start, end = pos + CHUNK_HEADER.size, pos + CHUNK_HEADER.size + length
        if end > len(data):
            break  # payload cut short at end of file
        if end - (pos - pos % BLOCK_SIZE) > BLOCK_SIZE:
            raise WandbFileError(f"{path}: chunk at offset {pos} overflows its 32 KiB block")
        payload = data[start:end]
        if zlib.crc32(bytes([ctype]) + payload) != crc:
            raise WandbFileError(f"{path}: CRC mismatch in chunk at offset {pos}")
        if ctype == FULL:
            if parts is not None:
                raise WandbFileError(f"{path}: full chunk at offset {pos} inside a split record")
            records.append(payload)
        elif ctype == FIRST:
            if parts is not None:
                raise WandbFileError(f"{path}: first chunk at offset {pos} inside a split record")
            parts = [payload]
        elif ctype in (MIDDLE, LAST):
            if parts is None:
                raise WandbFileError(f"{path}: chunk type {ctype} at offset {pos} with no first")
            parts.append(payload)
            if ctype == LAST:
                records.append(b"".join(parts))
                parts = None
        else:
            raise WandbFileError(f"{path}: unknown chunk type {ctype} at offset {pos}")
        pos = end
    return records


def read_records(path: str | Path) -> list[Any]:
    """All complete records (`wandb_internal_pb2.Record`) of one `.wandb` file, in the order
    they were written."""
    path = Path(path)
    out = []
    for payload in _split_records(path.read_bytes(), path):
        rec = Record()
        rec.ParseFromString(payload)
        out.append(rec)
    return out


def _sort_key(run_file: Path) -> tuple[str, int, str]:
    # Directory: offline-run-<time>-<id>[-<n>]; file: run-<id>.wandb.
    run_id = run_file.stem.removeprefix("run-")
    m = _RUN_DIR.match(run_file.parent.name)
    if m and m.group(2).startswith(run_id):
        rest = m.group(2)[len(run_id) :]
        if rest == "":
            return (m.group(1), 0, "")
        if rest[0] == "-" and rest[1:].isdigit():
            return (m.group(1), int(rest[1:]), "")
    return ("", 0, run_file.parent.name)


def find_offline_runs(wandb_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Every `run-<id>.wandb` under `wandb_dir` (the `wandb` directory itself, or the directory
    given to `wandb.init(dir=...)`), oldest first. A resumed run has one file per process
    lifetime, all with the same id. `run_id` keeps only that run's files."""
    root = Path(wandb_dir)
    if (root / "wandb").is_dir():
        root = root / "wandb"
    files = [
        f
        for pattern in ("offline-run-*/run-*.wandb", "run-*/run-*.wandb")
        for f in root.glob(pattern)
        if not f.parent.is_symlink()
    ]
    if run_id is not None:
        files = [f for f in files if f.name == f"run-{run_id}.wandb"]
    return sorted(set(files), key=_sort_key)


def find_offline_run(wandb_dir: str | Path, run_id: str | None = None) -> Path:
    """The newest `.wandb` file under `wandb_dir` (see `find_offline_runs`); raises
    FileNotFoundError if there is none."""
    files = find_offline_runs(wandb_dir, run_id)
    if not files:
        which = f" for run id {run_id!r}" if run_id else ""
        raise FileNotFoundError(
            f"no W&B run file (offline-run-*/run-*.wandb){which} under {wandb_dir}: "
            "was the run started with WANDB_MODE=offline and dir= pointing here?"
        )
    return files[-1]


def _resolve(path: str | Path) -> list[Path]:
    """A `.wandb` file, one run directory, or a wandb directory -> the run files it names,
    oldest first. A directory holding runs with different ids is ambiguous and raises."""
    p = Path(path)
    if p.is_file():
        return [p]
    own = sorted(p.glob("run-*.wandb"))
    if own:  # a single offline-run-* directory
        return own
    files = find_offline_runs(p)
    if not files:
        find_offline_run(p)  # raises with the explanation
    ids = sorted({f.stem.removeprefix("run-") for f in files})
    if len(ids) > 1:
        raise ValueError(
            f"{p} holds W&B runs with different ids {ids}: pass one run's file, or pick one with "
            "find_offline_runs(dir, run_id=...)"
        )
    return files


def _item_path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _set_path(d: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[keys[-1]] = value


def _del_path(d: dict[str, Any], keys: list[str]) -> None:
    for k in keys[:-1]:
        d = d.get(k)  # type: ignore[assignment]
        if not isinstance(d, dict):
            return
    d.pop(keys[-1], None)


def _rewound_to(rec: Any) -> int | None:
    """The step a run record rewinds its own run to (`wandb.init(resume_from=...)`), or None."""
    bp = rec.run.branch_point
    if rec.run.HasField("branch_point") and bp.run == rec.run.run_id and bp.metric == "_step":
        return int(bp.value)
    return None


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """One dict per logged step, in order, across all files of the run (see `_resolve`): key ->
    decoded JSON value, including wandb's `_step`, `_runtime` and `_timestamp`. A value logged
    as a nested dict comes back as a nested dict. A file that rewinds the run to a step (its run
    record's branch point names its own run) drops the earlier files' rows past that step, as
    W&B does when `wandb sync` uploads it."""
    rows: list[dict[str, Any]] = []
    for f in _resolve(path):
        for rec in read_records(f):
            if rec.WhichOneof("record_type") == "run":
                step = _rewound_to(rec)
                if step is not None:
                    rows = [r for r in rows if r["_step"] <= step]
            if rec.WhichOneof("record_type") != "history":
                continue
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _set_path(row, _item_path(item), _item_value(item))
            row.setdefault("_step", rec.history.step.num)
            rows.append(row)
    return rows


def read_config(path: str | Path, *, include_wandb: bool = False) -> dict[str, Any]:
    """The run's config: the run record's initial config, then every config update and removal
    in order, across all files of the run. wandb's own `_wandb` entry is left out unless
    `include_wandb`."""
    config: dict[str, Any] = {}

    def apply(record: Any) -> None:
        for item in record.update:
            _set_path(config, _item_path(item), json.loads(item.value_json))
        for item in record.remove:
            _del_path(config, _item_path(item))

    for f in _resolve(path):
        for rec in read_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                apply(rec.run.config)
            elif kind == "config":
                apply(rec.config)
    if not include_wandb:
        config.pop("_wandb", None)
    return config


def _run_record_info(f: Path) -> dict[str, Any]:
    for rec in read_records(f):
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            return {
                "run_id": r.run_id,
                "project": r.project,
                "entity": r.entity,
                "display_name": r.display_name,
                "group": r.run_group,
                "start_time": r.start_time.seconds + r.start_time.nanos * 1e-9,
                # `resume`: the process asked to resume (wandb.init(resume=...)); `resumed`: the
                # server confirmed a resume (never set offline); `starting_step`: the step the
                # server said to continue from (0 offline).
                "resume": r.resume,
                "resumed": r.resumed,
                "starting_step": r.starting_step,
                # `rewound_to`: the step `wandb.init(resume_from=...)` rewound the run to.
                "rewound_to": _rewound_to(rec),
                "file": str(f),
            }
    raise WandbFileError(f"{f}: no run record (the run did not get past wandb.init)")


def read_run_info(path: str | Path) -> dict[str, Any]:
    """Identity of a run: run_id, project, entity, display_name, group, plus `segments`, one dict per
    file (oldest first) with that file's start_time, resume, resumed, starting_step, rewound_to
    and file. The top-level resume/resumed flags are those of the newest file."""
    segments = [_run_record_info(f) for f in _resolve(path)]
    ids = {s["run_id"] for s in segments}
    if len(ids) != 1:
        raise WandbFileError(f"{path}: files record different run ids {sorted(ids)}")
    last = segments[-1]
    return {
        "run_id": last["run_id"],
        "project": last["project"],
        "entity": last["entity"],
        "display_name": last["display_name"],
        "group": last["group"],
        "resume": last["resume"],
        "resumed": last["resumed"],
        "files": [s["file"] for s in segments],
        "segments": segments,
    }
