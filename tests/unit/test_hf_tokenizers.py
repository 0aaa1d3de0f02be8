"""Hugging Face tokenizers from prepare to every reader: the ids of each shape of tokenizer equal
the `tokenizers` library's own, BOS and EOS as the model's files say, 32-bit ids past 65,536,
exact loss masks, one content hash wherever the tokenizer is copied, the data dir's tokenizer
read back (locally and remotely) and checked, and bad input refused in one line with nothing
written. The tokenizers are built here (`tests.hf_tokenizers`): no download."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from pretrain.data.shards import DataError, data_tokenizer, read_manifest
from pretrain.model import GPT, GPTConfig
from pretrain.prepare import PrepareConfig, PrepareError, TokenizerConfig, run_prepare
from pretrain.pretrained import Pretrained, SourceError, check_tokenizer, check_vocab_fits
from pretrain.tokenizer import (
    TokenizerError,
    content_sha256,
    differences,
    find_tokenizer,
    load_tokenizer,
)
from tests.data_fixtures import make_corpus, sft_records
from tests.hf_tokenizers import BIG_VOCAB, KINDS, SPECS, build

LITERALS = "<|endoftext|> </s> <s> <|begin_of_text|> <|end_of_text|> <|im_start|> <pad> <unk>"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{kind: its directory} for every kind, and "llama3-big" (ids past 65,535)."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    dirs = {kind: build(kind, root / kind) for kind in KINDS}
    dirs["llama3-big"] = build("llama3", root / "llama3-big", big=True)
    return dirs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 standard-library files and a .jsonl of short documents (accents composed and not,
    CJK, emoji, whitespace runs)."""
    root = make_corpus(tmp_path_factory.mktemp("hf_corpus"), 24)
    lines = ["naïve café and cafe\u0301 ÅÅ", "東京 🙂 \t\t  x  \n\n", "  leading spaces", "x"]
    (root / "extra.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    return root


def _prepare(corpus: Path, out: Path, tokenizer: Path | str, **kw: object) -> Path:
    cfg = PrepareConfig(
        input=[str(corpus / "**" / "*.py"), str(corpus / "*.jsonl")],
        output=str(out),
        tokenizer=TokenizerConfig(path=str(tokenizer)),
        shard_tokens=4096,
        val_fraction=0.1,
        val_min_documents=2,
        num_proc=1,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return run_prepare(cfg)


def _input_documents(corpus: Path) -> list[str]:
    """The documents in input order, read without prepare's code: sorted files; a .py file is
    one document, a .jsonl line's text is one."""
    files = sorted(os.path.abspath(p) for p in corpus.rglob("*") if p.is_file())
    docs = []
    for f in files:
        if f.endswith(".py"):
            docs.append(Path(f).read_text(encoding="utf-8"))
        else:
            docs += [json.loads(line)["text"] for line in Path(f).read_text().splitlines()]
    return docs


def stored_documents(data: Path) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """{input index: (tokens, loss mask or None)} of every shard, read with tarfile."""
    m = json.loads((data / "manifest.json").read_text())
    docs: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for split in m["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(data / shard["name"]) as tar:
                for member in tar.getmembers():
                    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                    key, _, ext = member.name.partition(".")
                    if ext.startswith("tokens."):
                        dtype = {"tokens.u16": "<u2", "tokens.u32": "<u4"}[ext]
                        docs[int(key)] = (np.frombuffer(raw, dtype), None)
                    else:
                        docs[int(key)] = (docs[int(key)][0], np.frombuffer(raw, np.uint8))
    return docs


def _reference(tokenizer_dir: Path) -> Tokenizer:
    """The tokenizers library's own reading of the file; literal special text stays text."""
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    raw.encode_special_tokens = True
    return raw


# ---- prepare with each kind --------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*KINDS, "llama3-big"])
def test_prepare_gives_the_tokenizers_own_ids_with_the_models_bos_and_eos(
    kind: str, built: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    """Every document = the tokenizers library's encode (its post-processor included: BOS for
    Llama 3 and Llama 2, nothing for GPT-2 and Qwen, EOS appended by the T5-style one) + the
    EOS once; the same shards with 1 and 2 processes."""
    spec = SPECS[kind.removesuffix("-big")]
    raw = _reference(built[kind])
    eos = raw.token_to_id(spec.eos)
    one = _prepare(corpus, tmp_path / "p1", built[kind], num_proc=1)
    two = _prepare(corpus, tmp_path / "p2", built[kind], num_proc=2)

    texts = _input_documents(corpus)
    got = stored_documents(one)
    assert sorted(got) == list(range(len(texts)))
    for i, text in enumerate(texts):
        expected = raw.encode(text).ids + ([] if spec.appends_eos else [eos])
        assert got[i][0].tolist() == expected, (kind, i)
        assert got[i][1] is None
        bos = raw.token_to_id(spec.bos) if spec.bos else None
        assert (expected[0] == bos) == spec.adds_bos
        assert expected.count(eos) == 1
    m = read_manifest(one)
    assert (m.eos_id, m.tokenizer_kind) == (eos, "hf")
    assert m.bos_id == (raw.token_to_id(spec.bos) if spec.bos else -1)
    assert m.vocab_size == max(raw.get_vocab(with_added_tokens=True).values()) + 1
    assert m.num_tokens["train"] + m.num_tokens["val"] == sum(len(d) for d, _ in got.values())

    # Deterministic: byte-identical files whatever num_proc (the manifest records it).
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "manifest.json":
            assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    assert read_manifest(two).raw["splits"] == m.raw["splits"]


def test_a_vocabulary_past_65536_is_stored_as_32_bit_ids(
    built: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    raw = _reference(built["llama3-big"])
    bos, eos = raw.token_to_id("<|begin_of_text|>"), raw.token_to_id("<|end_of_text|>")
    assert min(bos, eos) >= BIG_VOCAB > 1 << 16
    out = _prepare(corpus, tmp_path / "big", built["llama3-big"])
    m = read_manifest(out)
    assert (m.dtype, m.token_ext) == ("uint32", "tokens.u32")
    assert m.vocab_size == raw.get_vocab_size(with_added_tokens=True) > 1 << 16
    assert all(d[0] == bos and d[-1] == eos for d, _ in stored_documents(out).values())
    small = read_manifest(_prepare(corpus, tmp_path / "small", built["llama3"]))
    assert small.dtype == "uint16"


@pytest.mark.parametrize("kind", KINDS)
def test_special_token_text_in_a_document_stays_text(kind: str, built: dict[str, Path]) -> None:
    """Literal "<|endoftext|>", "</s>", ... in a document encode as text: no special id inside
    the document, and it decodes back (the tokenizers library's default would match them)."""
    tok = load_tokenizer(built[kind])
    text = f"before {LITERALS} after"
    [(ids, _)] = tok.encode_documents([("", text)])
    head, tail = tok.document_ends()
    inner = ids[len(head) : len(ids) - len(tail)]
    special = {
        i for i, t in Tokenizer.from_file(str(built[kind] / "tokenizer.json"))
        .get_added_tokens_decoder().items() if t.special
    }  # fmt: skip
    assert not special & set(inner)
    assert tok.decode(ids).strip() == text
    plain = Tokenizer.from_file(str(built[kind] / "tokenizer.json"))
    assert special & set(plain.encode(text, add_special_tokens=False).ids)  # the default would


@pytest.mark.parametrize("kind", ["llama3", "qwen", "llama2"])
def test_fine_tuning_records_keep_an_exact_mask(
    kind: str, built: dict[str, Path], tmp_path: Path
) -> None:
    """BOS + prompt are outside the loss, the response and the EOS inside, with any tokenizer."""
    src = tmp_path / "sft"
    src.mkdir()
    records = sft_records(60)
    (src / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = PrepareConfig(
        input=str(src / "r.jsonl"),
        output=str(tmp_path / "out"),
        tokenizer=TokenizerConfig(path=str(built[kind])),
        shard_tokens=2048,
        val_fraction=0.1,
        num_proc=2,
    )
    out = run_prepare(cfg)
    raw, spec = _reference(built[kind]), SPECS[kind]
    head = [raw.token_to_id(spec.bos)] if spec.adds_bos else []
    eos = raw.token_to_id(spec.eos)
    docs = stored_documents(out)
    assert read_manifest(out).loss_mask and len(docs) == len(records)
    for i, r in enumerate(records):
        # Prompt and response encoded as one text (as the model reads them), split where the
        # prompt's characters end: the tokens ending inside the prompt are context.
        joint = raw.encode(r["prompt"] + r["response"], add_special_tokens=False)
        n_prompt = sum(1 for _, end in joint.offsets if end <= len(r["prompt"]))
        tokens, mask = docs[i]
        assert tokens.tolist() == head + joint.ids + [eos]
        assert mask is not None
        n_context = len(head) + n_prompt
        assert mask.tolist() == [0] * n_context + [1] * (len(tokens) - n_context)


def test_bos_follows_transformers_reading_of_the_files(built: dict[str, Path]) -> None:
    """What transformers' tokenizer puts around a text is what frames a prepared document
    (its tokenizer_config.json's add_bos_token, where set, overrides the post-processor)."""
    from transformers import PreTrainedTokenizerFast

    for kind in KINDS:
        theirs = PreTrainedTokenizerFast.from_pretrained(built[kind])
        tok = load_tokenizer(built[kind])
        head, tail = tok.document_ends()
        bare = theirs("x = 1", add_special_tokens=False)["input_ids"]
        full = theirs("x = 1")["input_ids"]
        assert full[: len(head)] == head and full[len(head) : len(head) + len(bare)] == bare
        assert full[len(head) + len(bare) :] in ([], tail), kind


def test_add_bos_token_in_the_config_frames_as_transformers_reads_it(
    built: dict[str, Path], tmp_path: Path
) -> None:
    """`add_bos_token` in tokenizer_config.json: transformers' Llama class rebuilds the
    post-processor from it (Llama 2, Mistral), its generic class keeps tokenizer.json's. The
    data's BOS is what AutoTokenizer adds, whichever the class."""
    from transformers import AutoTokenizer

    cases = [("llama3", False, None), ("llama2", False, "LlamaTokenizer"), ("llama2", True, "LlamaTokenizer"),
             ("qwen", True, None), ("llama2", False, "PreTrainedTokenizerFast")]  # fmt: skip
    seen = set()
    for n, (kind, add, cls) in enumerate(cases):
        d = tmp_path / f"{kind}-{n}"
        shutil.copytree(built[kind], d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["add_bos_token"] = add
        if cls is not None:
            cfg["tokenizer_class"] = cls
        if add and kind == "qwen":
            cfg["bos_token"] = "<|im_start|>"
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        tok, theirs = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
        full = theirs("a", add_special_tokens=True)["input_ids"]
        bare = theirs("a", add_special_tokens=False)["input_ids"]
        head = full[: full.index(bare[0])]
        assert tok.document_ends()[0] == head, (kind, add, cls)
        assert tok.add_bos == bool(head)
        seen.add(tok.add_bos)
    assert seen == {True, False}  # the cases frame both ways


def test_a_rerun_is_a_noop_and_overwrite_replaces_the_tokenizer(
    built: dict[str, Path], corpus: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = _prepare(corpus, tmp_path / "out", built["qwen"])
    before = (out / "manifest.json").read_bytes()
    _prepare(corpus, out, built["qwen"])  # the same prepare: nothing to do
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(PrepareError, match=r"tokenizer.path_sha256"):
        _prepare(corpus, out, built["llama2"])  # another tokenizer: refused without overwrite
    _prepare(corpus, out, tiny_data / "tokenizer.model", overwrite=True)
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer").exists()
    assert read_manifest(out).tokenizer_kind == "sentencepiece"


# ---- EOS from the config files, bad input ------------------------------------------------------


def test_eos_comes_from_generation_config_then_config(built: dict[str, Path], tmp_path: Path):
    d = tmp_path / "gpt2"
    shutil.copytree(built["gpt2"], d)
    raw = _reference(d)
    eot = raw.token_to_id("<|endoftext|>")
    tok = load_tokenizer(d)  # tokenizer_config.json names no token: generation_config.json does
    assert tok.eos_id == eot and not tok.add_bos
    assert sorted(tok.contents) == ["generation_config.json", "tokenizer.json",
                                    "tokenizer_config.json"]  # fmt: skip
    (d / "generation_config.json").rename(tmp_path / "gen.json")
    (d / "config.json").write_text(json.dumps({"eos_token_id": [eot, 0], "vocab_size": 5}))
    tok = load_tokenizer(d)
    assert tok.eos_id == eot and "config.json" in tok.contents
    (d / "config.json").unlink()
    with pytest.raises(TokenizerError, match=r"no EOS token") as e:
        load_tokenizer(d)
    assert "\n" not in str(e.value)


def test_bad_tokenizers_are_refused_in_one_line_and_nothing_is_written(
    built: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(built["llama3"] / "tokenizer.json", bare / "tokenizer.json")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    (weights_only / "config.json").write_text("{}")
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text("{}")
    (slow / "merges.txt").write_text("")
    wrong = tmp_path / "wrong"
    shutil.copytree(built["qwen"], wrong)
    cfg = json.loads((wrong / "tokenizer_config.json").read_text())
    (wrong / "tokenizer_config.json").write_text(json.dumps(cfg | {"eos_token": "<|nope|>"}))
    cases = {
        bare / "tokenizer.json": r"no EOS token.*tokenizer_config.json",
        weights_only: r"holds no tokenizer: expected tokenizer.json",
        slow: r"no tokenizer.json, only vocab.json and merges.txt.*save_pretrained",
        wrong: r"names eos_token '<\|nope\|>', which is not in its tokenizer.json",
        tmp_path / "missing": r"does not exist",
    }
    for path, match in cases.items():
        out = tmp_path / f"out-{path.name}"
        with pytest.raises(PrepareError, match=match) as e:
            _prepare(corpus, out, path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert not out.exists()


# ---- one hash wherever it is copied; the data dir's tokenizer read back ----------------------


def test_one_content_hash_across_copies(built: dict[str, Path], corpus: Path, tmp_path: Path):
    """A model dir's tokenizer, the data dir's copy, a run dir's copy and a tokenizer.json path
    hash alike; any file's bytes change it; a rewritten config file that says the same ids is
    another hash but not another tokenizer."""
    model = load_tokenizer(built["gpt2"])
    data = _prepare(corpus, tmp_path / "data", built["gpt2"])
    m = read_manifest(data)
    assert m.tokenizer_sha256 == model.sha256 == data_tokenizer(m).sha256
    assert model.sha256 == content_sha256(
        {p.name: p.read_bytes() for p in (data / "tokenizer").iterdir()}
    )
    run = data_tokenizer(m).save(tmp_path / "run")
    assert run == tmp_path / "run" / "tokenizer" == find_tokenizer(tmp_path / "run")
    assert load_tokenizer(tmp_path / "run").sha256 == model.sha256
    assert load_tokenizer(built["gpt2"] / "tokenizer.json").sha256 == model.sha256

    moved = tmp_path / "moved"
    shutil.copytree(built["gpt2"], moved)
    gen = json.loads((moved / "generation_config.json").read_text())
    (moved / "generation_config.json").write_text(json.dumps(gen, indent=4) + "\n")
    other = load_tokenizer(moved)
    assert other.sha256 != model.sha256 and differences(other, model) is None
    gen["eos_token_id"] = 7
    (moved / "generation_config.json").write_text(json.dumps(gen))
    assert differences(load_tokenizer(moved), model) == f"EOS id 7 vs {model.eos_id}"


def test_the_data_dirs_tokenizer_reads_remotely_and_is_checked(
    built: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    data = _prepare(corpus, tmp_path / "data", built["llama2"])
    local = data_tokenizer(read_manifest(data))
    remote_dir = f"pipe:cat {data}/{{path}}"
    remote = data_tokenizer(read_manifest(remote_dir, allow_pipe=True), allow_pipe=True)
    assert remote.sha256 == local.sha256 and remote.files == ()
    assert remote.encode("def f(x):  return 1") == local.encode("def f(x):  return 1")

    cfg = data / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text() + "\n")  # the same tokens, other bytes: not what was recorded
    with pytest.raises(DataError, match=r"manifest says .*not the one the shards were prepared"):
        data_tokenizer(read_manifest(data))


def test_sentencepiece_manifests_read_as_they_always_did(tiny_data: Path) -> None:
    m = read_manifest(tiny_data)
    assert (m.tokenizer, m.tokenizer_kind, m.tokenizer_files) == (
        "tokenizer.model", "sentencepiece", ("tokenizer.model",)
    )  # fmt: skip
    assert "tokenizer_kind" not in m.raw and "tokenizer_files" not in m.raw
    tok = data_tokenizer(m)
    assert tok.kind == "sentencepiece" and tok.sha256 == m.tokenizer_sha256
    legacy = Path(__file__).parents[1] / "fixtures" / "legacy_run" / "data"
    assert data_tokenizer(read_manifest(legacy)).sha256 == read_manifest(legacy).tokenizer_sha256


# ---- a model against a data dir -----------------------------------------------------------------


def _model(tokenizer_dir: Path, rows: int) -> Pretrained:
    cfg = GPTConfig(vocab_size=rows, block_size=16, n_layer=1, n_head=2, n_embd=16)
    return Pretrained("hf", tokenizer_dir, cfg, GPT(cfg).eval(), load_tokenizer(tokenizer_dir))


def test_a_mismatch_names_both_tokenizers_and_the_prepare_that_fixes_it(
    built: dict[str, Path], corpus: Path, tiny_data: Path, tmp_path: Path
) -> None:
    data = read_manifest(_prepare(corpus, tmp_path / "data", built["qwen"]))
    model = _model(built["qwen"], rows=2048)
    check_tokenizer(model, data)  # its own tokenizer

    sp_data = read_manifest(tiny_data)
    for p, m, theirs in (
        (model, sp_data, "sentencepiece"),
        (_model(built["llama3"], 2048), data, "hf"),
    ):
        with pytest.raises(SourceError) as e:
            check_tokenizer(p, m)
        msg = str(e.value)
        assert "\n" not in msg and "trained with another tokenizer" in msg
        assert p.tokenizer is not None
        assert f"the model's is hf {p.path} (sha256 {p.tokenizer.sha256[:12]}, " in msg
        assert f"{p.tokenizer.vocab_size:,} ids)" in msg
        assert (f"the data's is {theirs} {m.source}/{m.tokenizer} (sha256 "
                f"{m.tokenizer_sha256[:12]}, {m.vocab_size:,} ids)") in msg  # fmt: skip
        assert msg.endswith(
            "python -m pretrain.prepare input=<your corpus> output=<new dir> "
            f"tokenizer.path={p.path}"
        )


def test_data_ids_past_the_models_rows_are_refused(
    built: dict[str, Path], corpus: Path, tmp_path: Path
) -> None:
    m = read_manifest(_prepare(corpus, tmp_path / "data", built["llama3-big"]))
    check_vocab_fits(m.vocab_size, m)
    with pytest.raises(SourceError, match=rf"{m.vocab_size:,} ids but the model has 65,536"):
        check_vocab_fits(65_536, m)
    with pytest.raises(SourceError, match="65,536 embedding rows"):
        check_tokenizer(_model(built["llama3-big"], rows=65_536), m)  # the same tokenizer
