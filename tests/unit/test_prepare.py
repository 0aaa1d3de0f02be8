"""prepare: exact token counts, the corpus-wide shuffle into shards, the val split and its
minimum, fine-tuning records, determinism, atomic/restartable output, clear errors on bad input."""

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

from pretrain.data import writer
from pretrain.data.shards import DataError, read_manifest
from pretrain.prepare import PrepareConfig, PrepareError, TokenizerConfig, run_prepare
from pretrain.tokenizer import SentencePieceText, file_sha256
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
    tok = SentencePieceText(tiny_data / "tokenizer.model")
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
    real_add = writer.ShardWriter.add

    def add_then_die(self, key, tokens, mask, ntokens):  # dies halfway through the corpus
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real_add(self, key, tokens, mask, ntokens)

    monkeypatch.setattr(writer.ShardWriter, "add", add_then_die)
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


def _shard_contents(out: Path, split: str) -> list[list[tuple[str, bytes]]]:
    """Per shard of a split, in order: its (member extension, data) pairs in order."""
    m = read_manifest(out)
    result = []
    for s in m.shards(split):
        with tarfile.open(out / s.name) as tar:
            result.append(
                [(mb.name.split(".", 1)[1], tar.extractfile(mb).read()) for mb in tar.getmembers()]  # type: ignore[union-attr]
            )
    return result


def _grouped_corpus(root: Path, names: list[str]) -> Path:
    """Three 'sources' of 40 documents each whose files sort by source: a shard filled in input
    order would hold one source."""
    root.mkdir(parents=True)
    i = 0
    for source, line in (("code", "def f{}(x):\n    return x * {}\n"),
                         ("prose", "The {} quick brown foxes jump over {} lazy dogs.\n"),
                         ("table", "0x{:04x}: 0x{:04x},\n")):  # fmt: skip
        for k in range(40):
            text = "".join(line.format(k * 7 + j, j) for j in range(30 + k % 7))
            (root / names[i].format(source=source, k=k)).write_text(text)
            i += 1
    return root


def test_documents_are_shuffled_over_shards_independently_of_file_names(tmp_path: Path):
    by_source = _grouped_corpus(tmp_path / "a", ["{source}-{k:03d}.txt"] * 120)
    # The same documents under other names, so that input order is another order.
    renamed = _grouped_corpus(tmp_path / "b", [f"{(i * 37) % 120:03d}.txt" for i in range(120)])
    kw = dict(tokenizer=TokenizerConfig(vocab_size=400), shard_tokens=6000, val_fraction=0.05)
    a = run_prepare(_small_cfg(by_source, tmp_path / "out-a", **kw))
    b = run_prepare(_small_cfg(renamed, tmp_path / "out-b", **kw))
    c = run_prepare(_small_cfg(by_source, tmp_path / "out-c", seed=1, **kw))
    ma = read_manifest(a)
    assert len(ma.shards("train")) >= 6
    # Every train shard mixes the three sources (which the text of each tells apart).
    for shard in _shard_contents(a, "train"):
        sp = spm.SentencePieceProcessor(model_file=str(a / "tokenizer.model"))
        texts = [sp.decode(np.frombuffer(d, "<u2").tolist()) for ext, d in shard]
        kinds = {("def " in t) + 2 * ("foxes" in t) + 4 * ("0x" in t) for t in texts}
        assert len(kinds) >= 2, kinds  # ~12 documents a shard, of 2 or 3 sources
    # File names and input order change nothing but the keys: same tokens, same shards.
    for split in ("train", "val"):
        ca = [[d for _, d in sh] for sh in _shard_contents(a, split)]
        cb = [[d for _, d in sh] for sh in _shard_contents(b, split)]
        assert ca == cb
    # The seed decides the shuffle (and the split).
    assert [[d for _, d in sh] for sh in _shard_contents(c, "train")] != [
        [d for _, d in sh] for sh in _shard_contents(a, "train")
    ]


def _corpus_of(n: int, root: Path) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"{i:04d}.txt").write_text(f"document {i} says " + "word " * (20 + i % 13) + "\n")
    return root


def test_val_gets_a_minimum_of_documents_and_tokens_and_says_so(tmp_path: Path, capsys):
    corpus = _corpus_of(300, tmp_path / "c")
    kw: dict = dict(tokenizer=TokenizerConfig(vocab_size=300), shard_tokens=500, val_fraction=0.005)
    # val_fraction alone gives ~1-2 documents; the minimum of 20 documents wins (<= 10% of 300).
    out = run_prepare(
        _small_cfg(corpus, tmp_path / "o1", val_min_documents=20, val_min_tokens=0, **kw)
    )
    m = read_manifest(out)
    report = m.raw["val_split"]
    assert m.num_documents["val"] == report["documents"] == 20
    assert report["from_val_fraction"] < 5 and report["rule"] == "minimum"
    printed = capsys.readouterr().out
    assert "val: 20 documents (6.7%)" in printed and "raised to the minimum" in printed
    # A token minimum that needs more documents than the document minimum.
    per_doc = m.num_tokens["val"] / 20
    out2 = run_prepare(
        _small_cfg(
            corpus, tmp_path / "o2", val_min_documents=20, val_min_tokens=int(25 * per_doc), **kw
        )
    )
    m2 = read_manifest(out2)
    assert m2.num_tokens["val"] >= 25 * per_doc and 20 < m2.num_documents["val"] <= 30
    # The corpus cannot give 200 documents: val stops at 10% and says why.
    out3 = run_prepare(_small_cfg(corpus, tmp_path / "o3", val_min_documents=200, **kw))
    m3 = read_manifest(out3)
    total = m3.num_tokens["val"] + m3.num_tokens["train"]
    assert 25 <= m3.num_documents["val"] <= 30 and m3.num_tokens["val"] <= 0.1 * total
    assert m3.raw["val_split"]["rule"] == "minimum, capped"
    assert "this corpus is too small for: val stops at 10%" in capsys.readouterr().out
    # The val split grows along one ranking: the smaller val is part of the larger.
    val_docs = [{d for sh in _shard_contents(o, "val") for _, d in sh} for o in (out, out2, out3)]
    assert val_docs[0] <= val_docs[1] <= val_docs[2]
    # The defaults: 50 documents / 50,000 tokens; val_fraction=0 still means no val split.
    assert PrepareConfig.val_min_documents == 50 and PrepareConfig.val_min_tokens == 50_000
    out4 = run_prepare(_small_cfg(corpus, tmp_path / "o4", **(kw | {"val_fraction": 0.0})))
    assert read_manifest(out4).num_documents["val"] == 0


def test_fine_tuning_records_mask_the_prompt(tiny_data: Path, tmp_path: Path):
    c = tmp_path / "c"
    c.mkdir()
    records = [
        {"prompt": f"Question {i}: what is {i} + {i}?\n", "response": f"Answer: {2 * i}.\n"}
        for i in range(30)
    ]
    lines = [json.dumps(r) for r in records]
    lines += [json.dumps({"prompt": "no answer", "response": ""}),  # skipped: empty
              json.dumps({"prompt": "nul \u0000", "response": "x"}),  # skipped: binary
              json.dumps({"prompt": 3, "response": "x"}),  # skipped: no text
              json.dumps({"prompt": "", "response": "all of it counts\n"}),
              json.dumps({"text": "a plain document\n" * 3})]  # fmt: skip
    (c / "sft.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _small_cfg(c, tmp_path / "out", val_fraction=0.1, shard_tokens=200)
    cfg.tokenizer = TokenizerConfig(path=str(tiny_data / "tokenizer.model"))
    out = run_prepare(cfg)
    m = read_manifest(out)
    assert m.loss_mask and m.raw["format"] == "pretrain-shards/2"
    assert {k: v["count"] for k, v in m.raw["skipped"].items()} == {
        "binary": 1, "empty": 1, "no_text": 1
    }  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    expected: dict[bytes, bytes | None] = {}
    for r in records + [{"prompt": "", "response": "all of it counts\n"}]:
        p, t = sp.encode(r["prompt"]) if r["prompt"] else [], sp.encode(r["response"])
        ids = np.array(p + t + [sp.eos_id()], "<u2").tobytes()
        expected[ids] = (
            np.array([0] * len(p) + [1] * (len(t) + 1), np.uint8).tobytes() if p else None
        )
    expected[np.array(sp.encode("a plain document\n" * 3) + [sp.eos_id()], "<u2").tobytes()] = None
    got: dict[bytes, bytes | None] = {}
    for split in ("train", "val"):
        for shard in _shard_contents(out, split):
            for ext, data in shard:
                if ext == "tokens.u16":
                    got[data], last = None, data
                else:
                    assert ext == "loss.u8"
                    got[last] = data
    assert got == expected


def test_an_output_that_is_a_file_and_a_too_small_vocabulary_are_refused(tmp_path: Path):
    corpus = make_corpus(tmp_path / "corpus", n_files=3)
    (tmp_path / "taken").write_text("a file of the user's")
    with pytest.raises(PrepareError, match="is a file: give a directory"):
        run_prepare(tiny_config(corpus, tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "a file of the user's"
    with pytest.raises(PrepareError, match=r"tokenizer.vocab_size=-5: .* more than 260"):
        run_prepare(tiny_config(corpus, tmp_path / "out", tokenizer=TokenizerConfig(vocab_size=-5)))
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_no_prepare_wrote_is_never_replaced(tiny_data: Path, tmp_path: Path):
    """A user's own tokenizer.model in the output is refused in one line (kept byte for byte),
    used when tokenizer.path names it; one swapped in after a prepare is the user's too."""
    corpus = make_corpus(tmp_path / "c", n_files=6)
    out = tmp_path / "out"
    out.mkdir()
    mine = (tiny_data / "tokenizer.model").read_bytes()
    (out / "tokenizer.model").write_bytes(mine)
    refused = subprocess.run(
        [sys.executable, "-m", "pretrain.prepare", f"input={corpus}/**/*.py", f"output={out}",
         "tokenizer.vocab_size=1000", "num_proc=1"],
        env=test_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "holds a tokenizer that no prepare wrote there" in line
    assert f"pass tokenizer.path={out / 'tokenizer.model'}" in line
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == mine

    def cfg(output: Path, **kw: object) -> PrepareConfig:
        return tiny_config(corpus, output, num_proc=1, shard_tokens=4096, **kw)

    named = TokenizerConfig(path=str(out / "tokenizer.model"))
    run_prepare(cfg(out, tokenizer=named))
    assert (out / "tokenizer.model").read_bytes() == mine
    assert not (out / ".prepare-under-way").exists()

    # A prepare's own tokenizer, then the user's put in its place: the manifest does not name it.
    other = tmp_path / "other"
    run_prepare(cfg(other))
    run_prepare(cfg(other, seed=7, overwrite=True))  # its own tokenizer: replaced as asked
    (other / "tokenizer.model").write_bytes(mine)
    with pytest.raises(PrepareError, match="no prepare wrote there"):
        run_prepare(cfg(other, seed=8, overwrite=True))
    assert (other / "tokenizer.model").read_bytes() == mine
