"""Cleaning in prepare: planted exact and near copies, junk and personal data are removed from
the shards while distinct documents stay; decontamination; the report; determinism across
num_proc; an interrupted prepare with cleaning on, run again; the settings in the identity."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from pretrain.data import writer
from pretrain.data.clean import CleanConfig, Dedup, Pii, Switch
from pretrain.data.clean.config import QualityConfig
from pretrain.data.clean.pii import redact
from pretrain.data.clean.quality import failed_rule
from pretrain.prepare import PrepareConfig, PrepareError, TokenizerConfig, run_prepare
from tests.data_fixtures import shard_documents
from tests.planted_corpus import Planted, make_planted

ALL = CleanConfig(dedup=Dedup.near, quality=Switch.on, pii=Pii.redact)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return make_planted(tmp_path_factory.mktemp("planted"))


def prepare(planted: Planted, out: Path, clean: CleanConfig, **kw: object) -> Path:
    cfg = PrepareConfig(
        input=str(planted.path), output=str(out), tokenizer=TokenizerConfig(vocab_size=512),
        shard_tokens=100_000, clean=clean, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return run_prepare(cfg)


def texts(data: Path) -> list[str]:
    """Every document of both splits, decoded (without its EOS)."""
    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
    manifest = json.loads((data / "manifest.json").read_text())
    out = []
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            for doc in shard_documents(data, shard["name"]):
                out.append(sp.decode(doc[:-1].tolist()))
    return out


def test_planted_copies_junk_and_personal_data_do_not_reach_the_shards(
    planted: Planted, tmp_path: Path
) -> None:
    plain = prepare(planted, tmp_path / "plain", CleanConfig(dedup=Dedup.off))
    before = texts(plain)
    assert sum("BUY NOW cheap offer" in t for t in before) == 10
    assert sum(s in t for t in before for s in planted.pii) == 90

    data = prepare(planted, tmp_path / "clean", ALL, num_proc=2)
    kept = texts(data)
    # No copy of a distinct document, near or exact; no junk; no planted personal string.
    assert not any(re.search(r"\bchanged\d+\b", t) for t in kept)  # the near copies' words
    assert not any("BUY NOW cheap offer" in t for t in kept)
    assert not any(s in t for t in kept for s in planted.pii)
    # Each distinct document once (redacted where it held personal data), nearly all kept:
    # the quality rules may drop a few ordinary files (the report names them).
    expected = {redact(t)[0] for t in planted.distinct}
    assert len(kept) == len(set(kept)) and set(kept) <= expected
    assert len(kept) >= 0.97 * len(expected)

    manifest = json.loads((data / "manifest.json").read_text())
    rules = manifest["clean"]["rules"]
    assert rules["exact_duplicate"]["documents"] == 40
    assert rules["near_duplicate"]["documents"] >= 40 and rules["near_duplicate"]["clusters"] >= 40
    assert rules["quality:max_dup_line_frac"]["documents"] >= 10
    assert rules["pii"]["replacements"]["email"] >= 30
    assert manifest["clean"]["kept"]["documents"] == len(kept)
    # The report's samples: the input key, the rule, an excerpt, the copy that was kept.
    samples = [json.loads(line) for line in (data / "clean_report.jsonl").read_text().splitlines()]
    near = [s for s in samples if s["rule"] == "near_duplicate"]
    assert near and all(s["duplicate_of"].startswith(str(planted.path)) for s in near)
    assert all(not any(p in s["excerpt"] for p in planted.pii) for s in samples)

    # The same shards and report whatever num_proc is.
    again = prepare(planted, tmp_path / "one_proc", ALL, num_proc=1)
    shards = lambda d: json.loads((d / "manifest.json").read_text())["splits"]  # noqa: E731
    assert shards(again) == shards(data)
    assert (again / "clean_report.jsonl").read_text() == (data / "clean_report.jsonl").read_text()


def test_documents_sharing_an_evaluation_passage_are_dropped(planted: Planted, tmp_path: Path):
    # An evaluation set whose contexts are 30-word passages of three of the distinct documents
    # (their line breaks and indentation gone, as a benchmark would quote them).
    chosen = [3, 77, 150]
    evals = tmp_path / "eval.jsonl"
    lines = []
    for i in chosen:
        words = planted.distinct[i].split()
        mid = len(words) // 2  # the middle of a file: no licence header or common boilerplate
        lines.append(json.dumps({"context": " ".join(words[mid : mid + 30]), "answer": "yes"}))
    evals.write_text("\n".join(lines) + "\n")
    clean = CleanConfig(dedup=Dedup.off, exclude=[str(evals)])
    data = prepare(planted, tmp_path / "out", clean)
    kept = set(texts(data))
    for i in chosen:
        assert planted.distinct[i] not in kept
    others = [t for k, t in enumerate(planted.distinct) if k not in chosen]
    assert all(t in kept for t in others)
    rules = json.loads((data / "manifest.json").read_text())["clean"]["rules"]
    # The three and their exact and near copies in the corpus.
    copies = sum(1 + (i in planted.exact) + (i in planted.near) for i in chosen)
    assert rules["decontaminated"]["documents"] == copies

    # The evaluation texts count by content: edited, the same command is another prepare.
    evals.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(PrepareError, match=r"clean\.exclude_sha256"):
        prepare(planted, tmp_path / "out", clean)

    with pytest.raises(PrepareError, match="neither a file, a directory nor a task"):
        prepare(planted, tmp_path / "bad", CleanConfig(exclude=["no/such/eval"]))


def test_redaction_catches_the_documented_forms_and_leaves_code_alone() -> None:
    text = (
        "mail jane.doe+x@mail.example.co.uk, host 192.168.10.20, v6 2001:db8::8a2e:370:7334,\n"
        "call (555) 123-4567, 555-123-4567, +44 20 7946 0958 or +1 415 555 2671.\n"
    )
    out, counts = redact(text)
    assert counts == {"email": 1, "ip": 2, "phone": 4}, out
    assert "example" not in out and "192.168" not in out and "7946" not in out
    assert redact("link-local fe80::1 here") == ("link-local <IP_ADDRESS> here", {"email": 0, "ip": 1, "phone": 0})  # fmt: skip
    code = (
        "x = a[::2] + a[1::2] + a[10::20]; t = '12:30:45'; v = '3.11.7.1.2'; n = 1234567890;"
        " d = '2024-01-15'\n"
    )
    assert redact(code) == (code, {"email": 0, "ip": 0, "phone": 0})


def test_quality_rules_drop_junk_and_name_the_rule() -> None:
    q = QualityConfig()
    assert failed_rule("buy now, cheap offer!\n" * 400, q) == "max_dup_line_frac"
    assert failed_rule("tiny", q) == "min_words"
    assert failed_rule("x" * 60 + " " + "y" * 60, QualityConfig(min_words=0)) == "max_mean_word_len"
    rng = random.Random(0)
    vocab = [
        f"{rng.choice('bcdfglmnprst')}{rng.choice('aeiou')}{rng.choice('nrst')}{i}"
        for i in range(400)
    ]
    prose = "\n".join(" ".join(rng.choices(vocab, k=12)) for _ in range(40))
    assert failed_rule(prose, q) is None


def test_interrupted_prepare_with_cleaning_then_run_again(
    planted: Planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = prepare(planted, tmp_path / "ref", ALL)
    calls = {"n": 0}
    real_add = writer.ShardWriter.add

    def add_then_die(self, *args):  # dies halfway through the shards
        calls["n"] += 1
        if calls["n"] == 100:
            raise KeyboardInterrupt
        return real_add(self, *args)

    monkeypatch.setattr(writer.ShardWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(planted, tmp_path / "out", ALL)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not (out / "clean_report.jsonl").exists()
    prepare(planted, out, ALL)
    for path in reference.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            assert (out / path.relative_to(reference)).read_bytes() == path.read_bytes(), path

    # Other cleaning settings over a finished prepare: refused, naming them.
    with pytest.raises(PrepareError, match=r"config\.clean\.pii: 'redact' -> 'off'"):
        prepare(planted, out, CleanConfig(dedup=Dedup.near, quality=Switch.on))


def test_choices_given_as_strings_from_python_or_yaml_booleans_work(planted: Planted, tmp_path):
    # As YAML or a Python caller may give them: "redact", True for on.
    clean = CleanConfig(dedup="exact", quality=True, pii="redact")  # type: ignore[arg-type]
    data = prepare(planted, tmp_path / "out", clean)
    assert not any(s in t for t in texts(data) for s in planted.pii)
    rules = json.loads((data / "manifest.json").read_text())["clean"]["rules"]
    assert "pii" in rules and "quality:max_dup_line_frac" in rules
    with pytest.raises(PrepareError, match=r"clean\.dedup='nearr': choose off\|exact\|near"):
        prepare(planted, tmp_path / "bad", CleanConfig(dedup="nearr"))  # type: ignore[arg-type]


def test_fine_tuning_records_are_deduplicated_exactly_with_prompt_and_response_apart() -> None:
    from pretrain.data.clean import Cleaner, CleanPass
    from pretrain.data.sources import Document

    template = " ".join(f"rule {i}: answer briefly and politely." for i in range(60))
    records = [
        Document("Paris.", template + " What is the capital of France?"),
        Document("Rome.", template + " What is the capital of Italy?"),  # shares the prompt
        Document("Paris.", template + " What is the capital of France?"),  # an exact copy
        Document("c", "a b"),
        Document("b c", "a"),  # the same words, another prompt/response boundary
    ]
    near = CleanConfig(dedup=Dedup.near)
    cleaner, kept = Cleaner(near), CleanPass(near)
    verdicts = [kept.keep(cleaner.apply(r)[1], f"records.jsonl:{i}", 10) for i, r in enumerate(records)]  # fmt: skip
    assert verdicts == [True, True, False, True, True]
    assert kept.as_dict()["rules"]["exact_duplicate"]["documents"] == 1
