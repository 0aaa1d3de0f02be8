"""Prepare a corpus for training: documents → tokenizer → WebDataset token shards + manifest.

    python -m pretrain.prepare output=data/stdlib                     # the embedded corpus
    python -m pretrain.prepare 'input=[corpus/*.jsonl.gz,notes/**/*.txt]' output=data/mine \
        tokenizer.vocab_size=16384
    python -m pretrain.prepare input=sft/*.jsonl output=data/sft tokenizer.path=data/mine/tokenizer.model
    python -m pretrain.prepare input=corpus/*.jsonl.gz output=data/llama3 tokenizer.path=models/Llama-3.2-1B

This module is the app (its config, and the order of the work); the seams live in
`pretrain.data`: `sources` reads the inputs into documents (what a document is: `.txt`/`.py`
files, `.jsonl(.gz)` lines with `text`, or fine-tuning records with `prompt` and `response`),
`tokenize` turns them into token ids, `writer` writes the shards, and `format` defines the shard
and manifest format that the loader reads.

What it writes into `output` (and nothing else): the tokenizer (tokenizer.model, or tokenizer/
for a Hugging Face one), train/ and val/ shards, clean_report.jsonl, and manifest.json last (see
`pretrain.data.format`). Token count of a document = len(encode(prompt)) + len(encode(text)) + 1
(the EOS; prompt is "" except for fine-tuning records), plus 1 for a BOS where a Hugging Face
tokenizer adds one; the manifest's counts are exact sums of that. Fine-tuning records also get
a loss mask: only response tokens (and the EOS) are targets of the loss.

Cleaning (`clean.*`, `pretrain.data.clean`): before a document is tokenized, in the workers,
its personal data can be redacted and it can be dropped by decontamination or the quality
rules; in the main process, in input order, duplicates (exact by default, or near) are dropped,
the first copy surviving. What each rule did goes to the output, the manifest and
clean_report.jsonl.

Tokenizer: sentencepiece BPE with byte fallback (see pretrain.tokenizer), trained on at most
`tokenizer.sample_bytes` of text: whole files in a seeded order of their paths relative to the
inputs' common directory, cut at line ends into pieces of at most `max_sentence_bytes`. Or the
one `tokenizer.path` names: a sentencepiece .model, a Hugging Face model dir or its
tokenizer.json (with the config files next to it, which say its EOS and whether it adds a BOS:
`pretrain.tokenizer.hf`), a data dir's or run dir's tokenizer. Its files are copied into
`output`; vocabularies over 65,536 ids (added tokens included) are stored as 32-bit ids.

Splits: documents are ranked by a seeded hash of their *content*, so identical documents always
land on the same side and the split depends neither on file names nor on the machine. Val is the
documents whose hash falls below `val_fraction` of the hash range, extended along the ranking
until it holds at least `val_min_documents` documents and `val_min_tokens` tokens, as far as the
corpus allows: the extension stops at VAL_MIN_CAP (10%) of the corpus's documents and tokens.
With at least two documents and val_fraction > 0 both splits are non-empty. Prepare prints what
it chose and why, and records it in the manifest (`val_split`).

Shards: each split's documents are shuffled over the whole corpus (ordered by a second seeded
content hash), then cut into shards: a shard is closed before the document that would take it
over `shard_tokens` (a single longer document gets a shard of its own); documents are never
split. So a shard is a sample of the whole split, not one source's files, whatever order the
inputs are in. Val shards use `val_shard_tokens` (default: shard_tokens × val's share of the
tokens, so that val has about as many shards as train).

Deterministic: inputs are sorted, tokenization results are consumed in input order whatever
`num_proc` is, tar members have fixed metadata and the manifest holds no timestamps: the same
inputs and config give byte-identical shards and tokenizer, and manifests that differ at most in
the num_proc and output they record.

Atomic and restartable: every file is written to a hidden temp name, fsynced, then renamed; the
manifest goes last. Tokens are spilled to a hidden temp file in `output` before the shuffle
(about the size of the shards; deleted at the end). An interrupted prepare leaves no manifest, so
nothing reads its shards; running the same command again redoes the work from scratch (it
deletes this app's leftovers: shards, temp files and the tokenizer). Running it over a finished
prepare with the same config and inputs does nothing; with a different one it refuses unless
`overwrite=true`. A tokenizer in `output` that no prepare wrote (no manifest.json there names
it by content hash, and no prepare was under way: `.prepare-under-way`, present from the
tokenizer's write until the manifest's) is the user's: prepare refuses to replace it, unless
`tokenizer.path` names that very tokenizer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from tqdm import tqdm

from pretrain.data.clean import REPORT, CleanConfig, Cleaner, CleanPass, Dedup, Pii, Switch
from pretrain.data.clean.decontaminate import texts_sha256
from pretrain.data.clean.pii import redact
from pretrain.data.format import (
    FORMAT,
    MANIFEST,
    SPLITS,
    Shard,
    manifest_json,
    token_dtype,
    token_ext,
)
from pretrain.data.sources import (
    STDLIB,
    SUPPORTED,
    PrepareError,
    Skips,
    Unit,
    make_units,
    resolve_inputs,
    roots,
    training_sample,
)
from pretrain.data.tokenize import tokenized
from pretrain.data.writer import Spill, fsync_dir, write_split
from pretrain.tokenizer import (
    SP_FILE,
    TextTokenizer,
    TokenizerError,
    TokenizerTrainingError,
    load_tokenizer,
    remove_stored,
    train_tokenizer,
    write_atomic,
)
from pretrain.tokenizer.hf import HF_DIR

__all__ = ["PrepareConfig", "PrepareError", "TokenizerConfig", "run_prepare"]

VAL_MIN_CAP = 0.1  # the val minimums never take more than this share of documents or tokens
UNDER_WAY = ".prepare-under-way"  # in `output` from its tokenizer's write to its manifest's


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    """Number of sentencepiece pieces (256 byte pieces and 4 special ids included)."""
    path: str | None = None
    """An existing tokenizer to use instead of training one (copied into output): a
    sentencepiece .model, a Hugging Face model dir or tokenizer.json, a data dir's tokenizer."""
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
    """Directory that receives the tokenizer, train/, val/ and manifest.json."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """How the tokenizer is trained (or which one is reused)."""
    shard_tokens: int = 1 << 19
    """Soft upper bound on the tokens of a train shard (documents are never split)."""
    val_fraction: float = 0.005
    """Expected fraction of documents that go to the val split (0 = no val split)."""
    val_min_documents: int = 50
    """Val holds at least this many documents, as far as 10% of the corpus allows."""
    val_min_tokens: int = 50_000
    """Val holds at least this many tokens, as far as 10% of the corpus allows."""
    val_shard_tokens: int | None = None
    """Upper bound on the tokens of a val shard; default shard_tokens × val's token share."""
    seed: int = 0
    """Seeds the train/val split, the shuffle into shards and the tokenizer's training sample."""
    num_proc: int = 0
    """Tokenizer processes; 0 = every CPU this process may use."""
    overwrite: bool = False
    """Replace a finished prepare in `output` that was made with other inputs or settings."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """Dedup, decontamination, quality rules and PII redaction (`pretrain.data.clean`)."""


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


# --------------------------------------------------------------------------------------------
# The val split


def choose_val(
    split_key: np.ndarray, ntokens: np.ndarray, cfg: PrepareConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """(indices of the val documents, a report of the choice): the documents with the smallest
    split keys, as many as val_fraction gives and then as many more as the minimums need, capped
    at VAL_MIN_CAP of the documents and tokens (see the module docstring)."""
    n, total = len(split_key), int(ntokens.sum())
    ranked = np.lexsort((np.arange(n), split_key))  # by key; equal keys (equal docs) by index
    cum = np.cumsum(ntokens[ranked])  # cum[k - 1] = tokens of the first k ranked documents
    threshold = np.uint64(min(int(cfg.val_fraction * 2**64), 2**64 - 1))
    from_fraction = int((split_key < threshold).sum()) if cfg.val_fraction > 0 else 0
    k, reason = from_fraction, "val_fraction"
    if cfg.val_fraction > 0:
        need = max(cfg.val_min_documents, int(np.searchsorted(cum, cfg.val_min_tokens)) + 1)
        cap_share = max(cfg.val_fraction, VAL_MIN_CAP)
        cap = min(int(n * cap_share), int(np.searchsorted(cum, total * cap_share, "right")))
        if min(need, cap) > k:
            k = min(need, cap)
            reason = "minimum" if k == need else "minimum, capped"
        if n >= 2 and not 1 <= k <= n - 1:  # both splits non-empty
            k, reason = min(max(k, 1), n - 1), "both splits non-empty"
    if n < 2:
        k = 0
    val = np.sort(ranked[:k])
    report = {
        "documents": k,
        "tokens": int(cum[k - 1]) if k else 0,
        "from_val_fraction": from_fraction,
        "val_fraction": cfg.val_fraction,
        "val_min_documents": cfg.val_min_documents,
        "val_min_tokens": cfg.val_min_tokens,
        "cap_share": VAL_MIN_CAP,
        "rule": reason,
    }
    return val, report


def _describe_val(r: dict[str, Any], n: int, total: int) -> str:
    head = (
        f"val: {r['documents']:,} documents ({r['documents'] / max(n, 1):.1%}), "
        f"{r['tokens']:,} tokens ({r['tokens'] / max(total, 1):.1%})"
    )
    frac = f"val_fraction={r['val_fraction']} gives {r['from_val_fraction']:,}"
    mins = f"val_min_documents={r['val_min_documents']:,} / val_min_tokens={r['val_min_tokens']:,}"
    if r["rule"] == "val_fraction":
        return f"{head}: {frac} (at least {mins})"
    if r["rule"] == "minimum":
        return f"{head}: {frac}; raised to the minimum {mins}"
    if r["rule"] == "minimum, capped":
        return (
            f"{head}: {frac}; raised toward the minimum {mins}, which this corpus is too small "
            f"for: val stops at {r['cap_share']:.0%} of it"
        )
    return f"{head}: {frac}; one document moved so that both splits are non-empty"


# --------------------------------------------------------------------------------------------
# The run


def _num_proc(n: int) -> int:
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _identity(cfg: PrepareConfig, files: list[str], tok_sha: str | None) -> dict[str, Any]:
    """Everything that determines the output; two prepares with equal identities agree."""
    conf = _plain(dataclasses.asdict(cfg))
    for k in ("input", "output", "num_proc", "overwrite"):  # inputs count by the files they match
        conf.pop(k)
    if tok_sha is not None:
        conf["tokenizer"] = {"path_sha256": tok_sha}
    if cfg.clean.exclude:  # the evaluation texts by content: an edited file is another prepare
        conf["clean"]["exclude_sha256"] = texts_sha256(cfg.clean.exclude)
    listing = hashlib.sha256()
    for f in files:
        listing.update(f"{f}\0{os.path.getsize(f)}\n".encode())
    return {
        "format": FORMAT,
        "config": conf,
        "num_files": len(files),
        "files_sha256": listing.hexdigest(),
    }


def _plain(conf: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON values (typed choices by their names)."""
    return json.loads(json.dumps(conf, default=lambda o: o.value))  # type: ignore[no-any-return]


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
    (out / REPORT).unlink(missing_ok=True)
    remove_stored(out)


def _validate(cfg: PrepareConfig) -> None:
    if cfg.output in (None, "", MISSING):
        raise PrepareError("output is required: e.g. output=data/stdlib")
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise PrepareError(f"output={cfg.output} is a file: give a directory (new or prepared)")
    if cfg.tokenizer.path is None and cfg.tokenizer.vocab_size <= 260:
        raise PrepareError(
            f"tokenizer.vocab_size={cfg.tokenizer.vocab_size}: a tokenizer trained here holds 256 "
            "byte pieces and 4 special ids, so it needs more than 260 (e.g. 8192)"
        )
    if cfg.shard_tokens < 1:
        raise PrepareError(f"shard_tokens={cfg.shard_tokens} must be >= 1 (e.g. 1048576).")
    if cfg.val_shard_tokens is not None and cfg.val_shard_tokens < 1:
        raise PrepareError(f"val_shard_tokens={cfg.val_shard_tokens} must be >= 1 or null.")
    if not 0.0 <= cfg.val_fraction <= 0.5:
        raise PrepareError(f"val_fraction={cfg.val_fraction} must be in [0, 0.5] (e.g. 0.005).")
    if cfg.val_min_documents < 0 or cfg.val_min_tokens < 0:
        raise PrepareError("val_min_documents and val_min_tokens must be >= 0.")
    if cfg.num_proc < 0:
        raise PrepareError(f"num_proc={cfg.num_proc} must be >= 0 (0 = all CPUs).")
    if cfg.tokenizer.path is None and cfg.tokenizer.sample_bytes < 1:
        raise PrepareError("tokenizer.sample_bytes must be >= 1.")
    c = cfg.clean
    for name, kind in (("dedup", Dedup), ("quality", Switch), ("pii", Pii)):
        value = getattr(c, name)
        if isinstance(value, bool):  # YAML reads on/off as booleans
            value = "on" if value else "off"
        try:
            setattr(c, name, kind(value.value if isinstance(value, Enum) else value))
        except ValueError:
            choices = "|".join(m.value for m in kind)
            raise PrepareError(f"clean.{name}={value!r}: choose {choices}.") from None
    if c.near_bands > 255 or c.near_bands * c.near_rows > 1024:
        raise PrepareError("clean.near_bands must be <= 255 and near_bands x near_rows <= 1024.")
    if not 0.0 < c.near_threshold <= 1.0:
        raise PrepareError(
            f"clean.near_threshold={c.near_threshold} must be in (0, 1] (e.g. 0.75)."
        )
    if min(c.near_ngram, c.near_bands, c.near_rows, c.exclude_ngram) < 1 or c.report_samples < 0:
        raise PrepareError(
            "clean.near_ngram, near_bands, near_rows and exclude_ngram must be >= 1, "
            "clean.report_samples >= 0."
        )


def _check_existing(out: Path, identity: dict[str, Any], overwrite: bool, say: Any) -> bool:
    """True when `out` already holds this very prepare; raises when it holds another one."""
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return False
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
        return True
    if not overwrite:
        raise PrepareError(
            f"{out} already holds a different prepare:\n  "
            + "\n  ".join(diffs[:10])
            + "\nPass overwrite=true to replace it, or choose another output directory."
        )
    return False


def _check_own_tokenizer(out: Path, given: TextTokenizer | None) -> None:
    """Refuse to replace a tokenizer in `out` that no prepare wrote there (see the module
    docstring): a user's own tokenizer.model must not be overwritten or deleted silently."""
    for found in (out / SP_FILE, out / HF_DIR):
        if not found.exists() or (out / UNDER_WAY).exists():
            continue
        try:
            sha: str | None = load_tokenizer(found).sha256
        except TokenizerError:
            sha = None  # not even a tokenizer: certainly not one a prepare wrote
        try:
            ours = (
                sha is not None
                and json.loads((out / MANIFEST).read_text()).get("tokenizer_sha256") == sha
            )
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours and (given is None or given.sha256 != sha):
            raise PrepareError(
                f"output={out} holds a tokenizer that no prepare wrote there ({found}; no "
                f"{MANIFEST} there names it) and this prepare would replace it: to prepare "
                f"with it, pass tokenizer.path={found}; to use another one, move it out of "
                f"{out} first, or choose another output directory."
            )


def _train_tokenizer(
    cfg: PrepareConfig, units: list[Unit], out: Path, n_files: int, say: Any
) -> bytes:
    tc = cfg.tokenizer
    say(f"training a {tc.vocab_size}-piece BPE tokenizer on <= {tc.sample_bytes:,} bytes")
    sample_skips = Skips()
    sample = list(
        training_sample(units, tc.sample_bytes, tc.max_sentence_bytes, cfg.seed, sample_skips)
    )
    if cfg.clean.pii == Pii.redact:  # personal data must not become pieces of the vocabulary
        sample = [redact(piece)[0] for piece in sample]
    if not sample:
        raise PrepareError(
            f"no usable documents in {n_files} input file(s) (skipped: "
            f"{sample_skips.summary()}); every file is empty, unreadable or not UTF-8 text."
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp_model = out / ".tokenizer.train.tmp"
    try:
        train_tokenizer(
            sample,
            tc.vocab_size,
            tmp_model,
            num_threads=tc.num_threads,
            max_sentence_bytes=tc.max_sentence_bytes,
        )
        return tmp_model.read_bytes()
    except TokenizerTrainingError as exc:
        raise PrepareError(str(exc)) from exc
    finally:
        tmp_model.unlink(missing_ok=True)


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
    skips = Skips()
    for f in unsupported:
        skips.add("unsupported", f)
    if not files:
        raise PrepareError(
            f"input={cfg.input!r} matched {len(unsupported)} file(s) but none of a supported type "
            f"({', '.join(SUPPORTED)}); point input at such files."
        )
    units = make_units(files)

    # Reuse a given tokenizer (read now, into memory: cleaning the output may delete its files).
    given: TextTokenizer | None = None
    if cfg.tokenizer.path is not None:
        try:
            given = load_tokenizer(cfg.tokenizer.path)
        except TokenizerError as exc:
            raise PrepareError(
                f"tokenizer.path={cfg.tokenizer.path!r}: {exc} (or drop tokenizer.path to train "
                f"a sentencepiece tokenizer here)."
            ) from exc
    identity = _identity(cfg, files, given.sha256 if given is not None else None)
    if _check_existing(out, identity, cfg.overwrite, say):
        return out
    _check_own_tokenizer(out, given)
    cleaner = Cleaner(cfg.clean)  # reads clean.exclude's texts: a bad path fails here, early

    # 1. The tokenizer: trained on a bounded seeded sample, or the given one.
    model_bytes = None if given is not None else _train_tokenizer(cfg, units, out, len(files), say)

    # 2. Output directory: clear this app's leftovers, then the tokenizer.
    out.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out)
    (out / UNDER_WAY).touch()  # the tokenizer about to be written is ours (until the manifest)
    if given is not None:
        stored = given.save(out)
    else:
        assert model_bytes is not None
        stored = out / SP_FILE
        write_atomic(stored, model_bytes)
    tok = load_tokenizer(stored)
    dtype = token_dtype(tok.vocab_size)
    if given is not None:
        head, tail = tok.document_ends()
        say(
            f"tokenizer: {given.describe()}; a document is {head or ''}{' + ' if head else ''}"
            f"text + {tail}, as {dtype} ids"
        )
    np_dtype = "<u2" if dtype == "uint16" else "<u4"
    ext = token_ext(dtype)

    # 3. Tokenize every unit in parallel into the spill, in input order.
    num_proc = min(_num_proc(cfg.num_proc), len(units))
    cleaning = CleanPass(cfg.clean)
    spill = Spill(out)
    unreadable: set[str] = set()
    tty = sys.stderr.isatty()
    try:
        # The pool starts before the progress bar's monitor thread exists.
        with tokenized(
            units, str(stored), np_dtype, cfg.seed, num_proc, cleaner if cleaner.active else None
        ) as results:
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
                for doc in res.docs:
                    if cleaning.keep(doc.verdict, doc.where, doc.ntokens):
                        spill.add(doc)
                bar.set_postfix(docs=len(spill), refresh=False)
            bar.close()
        spill.finish()
        n_docs = len(spill)
        if n_docs == 0:
            spill.remove()
            _clean_leftovers(out)
            raise PrepareError(
                f"no usable documents in {len(files)} input file(s) (skipped: "
                f"{skips.summary()}); every document is empty, unreadable or not UTF-8 text."
            )

        # 4. The split, then each split's documents in seeded-shuffle order into shards.
        ntokens = np.frombuffer(spill.ntokens, dtype=np.int64)
        order_key = np.frombuffer(spill.order_key, dtype=np.uint64)
        val, val_report = choose_val(np.frombuffer(spill.split_key, dtype=np.uint64), ntokens, cfg)
        is_val = np.zeros(n_docs, bool)
        is_val[val] = True
        val_share = val_report["tokens"] / max(int(ntokens.sum()), 1)
        max_tokens = {
            "train": cfg.shard_tokens,
            "val": cfg.val_shard_tokens or max(1, int(cfg.shard_tokens * val_share)),
        }
        records: dict[str, list[Shard]] = {}
        itemsize = np.dtype(np_dtype).itemsize
        for split, members in (("train", ~is_val), ("val", is_val)):
            idx = np.flatnonzero(members)
            order = idx[np.lexsort((idx, order_key[idx]))]  # the shuffle; ties by input index
            records[split] = write_split(out, split, spill, order, max_tokens[split], ext, itemsize)
        loss_mask = spill.has_mask()
    finally:
        spill.remove()
    fsync_dir(out / "train")
    fsync_dir(out / "val")

    # 5. The manifest, last.
    manifest = manifest_json(
        tokenizer=tok,
        splits=records,
        loss_mask=loss_mask,
        val_split=val_report,
        skipped=skips.as_dict(),
        inputs={"num_files": len(files), "roots": roots(cfg.input)},
        identity=identity,
        config=_plain(dataclasses.asdict(cfg)) | {"num_proc": num_proc},
        clean=cleaning.as_dict(),
    )
    write_atomic(out / REPORT, cleaning.report().encode())
    manifest_path = out / MANIFEST
    write_atomic(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    (out / UNDER_WAY).unlink(missing_ok=True)
    fsync_dir(out)

    dt = time.perf_counter() - t0
    n_tokens = manifest["num_tokens"]
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    say(
        f"prepared {n_docs:,} documents, {n_tokens:,} tokens from {len(files):,} files in {dt:.1f}s "
        f"({n_tokens / dt:,.0f} tokens/s, {num_proc} processes)"
        + (" (fine-tuning records: loss on responses only)" if loss_mask else "")
        + "\n"
        f"  train: {tr['num_documents']:,} docs, {tr['num_tokens']:,} tokens, {len(tr['shards'])} shards\n"
        f"  val:   {va['num_documents']:,} docs, {va['num_tokens']:,} tokens, {len(va['shards'])} shards\n"
        f"  {_describe_val(val_report, n_docs, n_tokens)}\n" + "\n".join(cleaning.summary()) + "\n"
        f"  skipped inputs: {skips.summary()}\n"
        f"  -> {manifest_path}"
    )
    for reason, entry in skips.as_dict().items():
        say(f"  skipped {entry['count']} ({reason}), e.g. " + ", ".join(entry["examples"][:3]))
    return out


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
