"""prepare: exact token counts, determinism, atomic/restartable output, clear errors on bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from pretrain import prepare as prep
from pretrain.data.shards import DataError, read_manifest
from pretrain.prepare import PrepareConfig, PrepareError, TokenizerConfig, run_prepare
from pretrain.tokenizer import Tokenizer, file_sha256
from tests.conftest import test_env
from tests.data_fixtures import make_corpus, tiny_config


def _small_cfg(corpus: Path, out: Path, **kw: object) -> PrepareConfig:
    cfg = PrepareConfig(
        input=str(corpus / "*"),
        output=str(out),
        tokenizer=TokenizerConfig(vocab_size=300),
        shard_tokens=64,
        val_fraction=0.2,
        num_proc=1,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _members(tar_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return tar.getmembers()


def test_token_counts_are_exact_and_shards_hold_each_document(tiny_data: Path, tiny_corpus: Path):
    """Recompute everything with plain sentencepiece from the input files: the manifest's counts
    equal sum(len(encode(doc)) + 1), and every document's tokens sit in exactly one shard."""
    m = json.loads((tiny_data / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / m["tokenizer"]))
    assert file_sha256(tiny_data / m["tokenizer"]) == m["tokenizer_sha256"]
    assert (m["vocab_size"], m["eos_id"], m["dtype"]) == (
        sp.get_piece_size(),
        sp.eos_id(),
        "uint16",
    )

    # Documents in input order: sorted files, strict UTF-8, empty / NUL documents skipped.
    expected = []
    for path in sorted(os.path.abspath(p) for p in tiny_corpus.rglob("*.py")):
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and "\x00" not in text:
            expected.append(sp.encode(text) + [sp.eos_id()])
    assert m["num_documents"] == len(expected) > 100
    assert m["num_tokens"] == sum(len(d) for d in expected)

    seen = {}
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["num_tokens"] == sum(s["tokens"] for s in info["shards"])
        assert info["num_documents"] == sum(s["documents"] for s in info["shards"])
        for shard in info["shards"]:
            path = tiny_data / shard["name"]
            assert path.stat().st_size == shard["bytes"]
            assert file_sha256(path) == shard["sha256"]
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    # Fixed metadata: byte-identical tars for identical inputs.
                    assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
                    key, ext = member.name.split(".", 1)
                    assert ext == "tokens.u16" and key not in seen
                    seen[key] = np.frombuffer(tar.extractfile(member).read(), "<u2")
    assert sorted(seen) == [f"{i:08d}" for i in range(len(expected))]
    for i, doc in enumerate(expected):
        assert seen[f"{i:08d}"].tolist() == doc
    assert m["splits"]["val"]["num_documents"] >= 1 and m["splits"]["train"]["num_documents"] >= 1
    assert len(m["splits"]["train"]["shards"]) >= 16  # enough for 4 ranks x 2 workers
    for s in m["splits"]["train"]["shards"]:  # shard_tokens bounds shards, documents stay whole
        assert s["tokens"] <= 16_384 or s["documents"] == 1


def test_tokenizer_round_trips_documents(tiny_data: Path, tiny_corpus: Path):
    tok = Tokenizer(tiny_data / "tokenizer.model")
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.sha256 == file_sha256(tok.path)
    for path in sorted(tiny_corpus.rglob("*.py"))[:40]:
        text = path.read_text(encoding="utf-8")
        if "\u2581" not in text:
            assert tok.decode(tok.encode(text)) == text


def test_same_inputs_give_byte_identical_output_for_any_num_proc(tmp_path: Path):
    corpus = make_corpus(tmp_path / "corpus", n_files=40)
    outs = []
    for i, num_proc in enumerate((1, 2)):
        cfg = tiny_config(corpus, tmp_path / f"out{i}", shard_tokens=4096, num_proc=num_proc)
        outs.append(run_prepare(cfg))
    a, b = outs
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 5
    for rel in files_a:
        if rel.name != "manifest.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in outs)
    for m in (ma, mb):
        m["config"].pop("output"), m["config"].pop("num_proc")
    assert ma == mb


def test_rerun_is_a_noop_a_different_config_is_refused_unless_overwrite(tmp_path: Path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"document number {i}\n" * (5 + i))
    out = run_prepare(_small_cfg(corpus, tmp_path / "out"))
    before = (out / "manifest.json").stat().st_mtime_ns
    run_prepare(_small_cfg(corpus, tmp_path / "out", num_proc=2))  # num_proc changes nothing
    assert (out / "manifest.json").stat().st_mtime_ns == before

    with pytest.raises(
        PrepareError, match=r"different prepare(.|\n)*shard_tokens: 64 -> 32(.|\n)*overwrite=true"
    ):
        run_prepare(_small_cfg(corpus, tmp_path / "out", shard_tokens=32))
    (corpus / "d0.txt").write_text("changed and longer than before\n")
    with pytest.raises(PrepareError, match="the input files or their sizes changed"):
        run_prepare(_small_cfg(corpus, tmp_path / "out"))

    run_prepare(_small_cfg(corpus, tmp_path / "out", shard_tokens=32, overwrite=True))
    m = read_manifest(out)
    assert m.raw["config"]["shard_tokens"] == 32
    names = {s.name for split in m.splits.values() for s in split}
    on_disk = {str(p.relative_to(out)) for p in out.glob("*/*.tar")}
    assert names == on_disk  # no stale shard of the replaced prepare is left behind


def test_interrupted_prepare_leaves_nothing_that_looks_done_and_rerun_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    corpus = make_corpus(tmp_path / "corpus", n_files=30)
    cfg = tiny_config(corpus, tmp_path / "out", shard_tokens=2048, num_proc=1)
    reference = run_prepare(tiny_config(corpus, tmp_path / "ref", shard_tokens=2048, num_proc=1))

    calls = {"n": 0}
    real_add = prep.ShardWriter.add

    def add_then_die(self, key, data, ntokens):  # dies halfway through the corpus
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real_add(self, key, data, ntokens)

    monkeypatch.setattr(prep.ShardWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(cfg)
    monkeypatch.undo()
    out = Path(cfg.output)
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp"))
    for shard in out.glob("*/*.tar"):  # every visible shard is a whole tar
        assert _members(shard)
    with pytest.raises(DataError, match="did not finish"):
        read_manifest(out)

    (out / "train" / ".train-000099.tar.tmp").write_bytes(b"half a shard")  # a hard kill's leftover
    run_prepare(cfg)
    for path in reference.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            assert (out / path.relative_to(reference)).read_bytes() == path.read_bytes()
    assert not list(out.rglob("*.tmp"))


def test_bad_documents_are_skipped_counted_and_reported(tmp_path: Path, capsys):
    c = tmp_path / "c"
    c.mkdir()
    for i in range(4):
        (c / f"good{i}.txt").write_text(f"a good document {i}\n" * 20)
    (c / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (c / "binary.txt").write_bytes(b"\x7fELF\x00\x00\x01garbage")
    (c / "empty.txt").write_bytes(b"")
    (c / "notes.md").write_text("not a supported type\n")
    (c / "docs.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"text": "a json document\n" * 10}),
                "{not json",
                json.dumps({"title": "no text field"}),
                "",
                json.dumps({"text": "another json document\n" * 10}),
                '{"text": "lone surrogate \\ud800"}',
            ]
        )
        + "\n"
    )
    (c / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    (c / "ok.jsonl.gz").write_bytes(
        gzip.compress(json.dumps({"text": "zipped doc\n" * 9}).encode())
    )
    out = run_prepare(_small_cfg(c, tmp_path / "out"))
    m = json.loads((out / "manifest.json").read_text())
    skipped = {k: v["count"] for k, v in m["skipped"].items()}
    assert skipped == {
        "binary": 1,
        "empty": 1,
        "invalid_json": 1,
        "invalid_utf8": 2,
        "no_text": 1,
        "unreadable": 1,
        "unsupported": 1,
    }
    assert m["num_documents"] == 4 + 2 + 1
    assert any("broken.jsonl.gz" in e for e in m["skipped"]["unreadable"]["examples"])
    printed = capsys.readouterr().out
    assert "invalid_utf8" in printed and "latin1.txt" in printed


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda c: None, "matches no files"),
        (lambda c: [(c / f"e{i}.txt").write_bytes(b"") for i in range(3)], "no usable documents"),
        (
            lambda c: (c / "x.txt").write_bytes(b"\xff\xfe\x00junk"),
            r"no usable documents(.|\n)*invalid_utf8",
        ),
        (lambda c: (c / "x.csv").write_text("a,b\n"), "none of a supported type"),
    ],
)
def test_empty_corpus_fails_clearly_and_writes_nothing(tmp_path: Path, setup, match):
    c = tmp_path / "c"
    c.mkdir()
    setup(c)
    with pytest.raises(PrepareError, match=match):
        run_prepare(_small_cfg(c, tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*/*.tar")) if (tmp_path / "out").exists() else True


def test_vocab_too_large_is_rephrased_and_nothing_is_written(tmp_path: Path):
    c = tmp_path / "c"
    c.mkdir()
    (c / "a.txt").write_text("tiny corpus with few words\n" * 5)
    with pytest.raises(
        PrepareError, match=r"vocab_size=5000 is too large for this corpus(.|\n)*at most ~\d+"
    ):
        run_prepare(_small_cfg(c, tmp_path / "out", tokenizer=TokenizerConfig(vocab_size=5000)))
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_val_is_never_empty_with_two_documents(tmp_path: Path):
    c = tmp_path / "c"
    c.mkdir()
    for i in range(3):
        (c / f"{i}.txt").write_text(f"short document {i}\n" * 4)
    out = run_prepare(_small_cfg(c, tmp_path / "out", val_fraction=1e-6, shard_tokens=10_000))
    m = read_manifest(out)
    assert m.num_documents["val"] == 1 and m.num_documents["train"] == 2
    assert m.num_tokens["val"] + m.num_tokens["train"] == m.raw["num_tokens"]
    for split in ("train", "val"):
        for s in m.shards(split):  # the rewritten shard matches its record
            assert (
                file_sha256(out / s.name) == s.sha256 and len(_members(out / s.name)) == s.documents
            )


def test_reusing_a_tokenizer_copies_it(tiny_data: Path, tmp_path: Path):
    c = tmp_path / "c"
    c.mkdir()
    (c / "a.txt").write_text("def f(x):\n    return x\n" * 30)
    (c / "b.txt").write_text("class A:\n    pass\n" * 30)
    cfg = _small_cfg(c, tmp_path / "out")
    cfg.tokenizer = TokenizerConfig(path=str(tiny_data / "tokenizer.model"))
    out = run_prepare(cfg)
    assert file_sha256(out / "tokenizer.model") == file_sha256(tiny_data / "tokenizer.model")
    assert read_manifest(out).vocab_size == 512


def test_cli_writes_only_into_output_and_rejects_unknown_keys(tmp_path: Path):
    c = make_corpus(tmp_path / "c", n_files=4)
    run = tmp_path / "cwd"
    run.mkdir()
    bad = subprocess.run(
        [sys.executable, "-m", "pretrain.prepare", f"output={tmp_path / 'o'}", "vocab=5"],
        cwd=run,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "Key 'vocab' not in 'PrepareConfig'" in bad.stderr
    no_out = subprocess.run(
        [sys.executable, "-m", "pretrain.prepare"],
        cwd=run,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_out.returncode != 0 and "output=<dir> is required" in no_out.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.prepare",
            f"input={c}/**/*.py",
            f"output={tmp_path / 'o'}",
            "tokenizer.vocab_size=512",
            "num_proc=1",
        ],
        cwd=run,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert list(run.iterdir()) == []  # no outputs/, .hydra/ or log files
    assert (tmp_path / "o" / "manifest.json").is_file()
