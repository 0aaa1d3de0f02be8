"""A Hugging Face tokenizer through the real commands: prepare a corpus with a Llama-3-shaped
tokenizer whose ids pass 65,535 (32-bit shards), train on it, and the run's copy of the
tokenizer serves sample, eval (bits per byte decoded with it), compress, and the refusals: a
resumed run pointed at other data, a model evaluated on data of another tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from pretrain.data.shards import read_manifest, read_shard
from tests.conftest import REPO, test_env
from tests.data_fixtures import make_corpus
from tests.hf_tokenizers import build
from tests.integration.test_train import ok, train_cli

STEPS = ("train.max_steps=6", "checkpoint.every=3", "logging.wandb=false")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=test_env(HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if "error: " in line][-1]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tokenizer dir, data dir, run dir): 40 stdlib files prepared by the CLI with the
    Llama-3-shaped tokenizer (BOS added, ids past 65,535), and the debug model trained on it."""
    root = tmp_path_factory.mktemp("hf_data")
    tok = build("llama3", root / "tokenizer", big=True)
    corpus = make_corpus(root / "corpus", 40)
    data = root / "data"
    ok(run("-m", "pretrain.prepare", f"input={corpus}", f"output={data}", f"tokenizer.path={tok}",
           "shard_tokens=4096", "val_fraction=0.1", "val_min_tokens=3000", "num_proc=2"))  # fmt: skip
    ok(train_cli(data, root / "run", *STEPS))
    return tok, data, root / "run"


def test_the_run_keeps_the_tokenizer_and_trains_on_32_bit_ids(hf_run: tuple) -> None:
    tok, data, run_dir = hf_run
    m = read_manifest(data)
    assert (m.dtype, m.tokenizer_kind) == ("uint32", "hf")
    copy = run_dir / "tokenizer"
    assert sorted(p.name for p in copy.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (copy / name).read_bytes() == (tok / name).read_bytes()
    assert not (run_dir / "tokenizer.model").exists()
    cfg = (run_dir / "config.yaml").read_text()
    assert f"vocab_size: {m.vocab_size}" in cfg  # the model's rows come from the data
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps) == 6


def test_sample_continues_a_prompt_with_the_runs_tokenizer(hf_run: tuple) -> None:
    from pretrain.sample import SampleConfig, sample

    _, _, run_dir = hf_run
    texts = sample(SampleConfig(checkpoint=str(run_dir), prompt="def main(", num_samples=2,
                                max_new_tokens=12, device="cpu"))  # fmt: skip
    assert len(texts) == 2 and all(t.startswith("def main(") for t in texts)
    proc = ok(run("-m", "pretrain.sample", f"checkpoint={run_dir}", "max_new_tokens=8",
                  "num_samples=1", "device=cpu"))  # fmt: skip
    assert "----- sample 0 -----" in proc.stdout


def test_eval_decodes_bits_per_byte_with_the_datas_tokenizer(hf_run: tuple) -> None:
    tok, data, run_dir = hf_run
    proc = ok(run("-m", "pretrain.eval", f"checkpoint={run_dir}", f"data.dir={data}"))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    m = read_manifest(data)
    raw = Tokenizer.from_file(str(tok / "tokenizer.json"))
    docs = [d for s in m.shards("val") for d, _ in read_shard(m, s)]
    n_bytes = sum(len(raw.decode(d.tolist(), skip_special_tokens=True).encode()) for d in docs)
    assert result["tokens"] == m.num_tokens["val"] and result["bytes"] == n_bytes


def test_compress_carries_the_tokenizer(hf_run: tuple, tmp_path: Path) -> None:
    from pretrain.pretrained import load_pretrained

    _, data, run_dir = hf_run
    out = tmp_path / "int8"
    ok(run("-m", "pretrain.compress", str(run_dir), str(out), "--quantize", "int8",
           "--eval-documents", "2", "--rounds", "1", "--gen-tokens", "4"))  # fmt: skip
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    p = load_pretrained(out)
    assert p.tokenizer is not None and p.tokenizer.kind == "hf"
    assert p.tokenizer.sha256 == read_manifest(data).tokenizer_sha256


def test_other_data_is_refused_by_a_resumed_run_and_by_eval(hf_run: tuple, tiny_data: Path):
    tok, data, run_dir = hf_run
    m, sp = read_manifest(data), read_manifest(tiny_data)
    # The run resumed on data of another tokenizer: its own copy decides.
    line = error_line(train_cli(tiny_data, run_dir, *STEPS[1:], "train.max_steps=9"))
    assert f"this run was trained with hf {run_dir / 'tokenizer'}" in line
    assert f"(sha256 {m.tokenizer_sha256[:12]}" in line
    assert f"sentencepiece {tiny_data}/tokenizer.model (sha256 {sp.tokenizer_sha256[:12]}" in line
    assert f"tokenizer.path={run_dir / 'tokenizer'}" in line  # the prepare that fixes it
    # The model evaluated on data of another tokenizer: both named, and the prepare that fixes it.
    line = error_line(run("-m", "pretrain.eval", f"checkpoint={run_dir}", f"data.dir={tiny_data}"))
    assert "trained with another tokenizer" in line
    assert f"the model's is hf {run_dir / 'tokenizer'} (sha256 {m.tokenizer_sha256[:12]}" in line
    assert line.endswith(
        f"python -m pretrain.prepare input=<your corpus> output=<new dir> "
        f"tokenizer.path={run_dir / 'tokenizer'}"
    )


def test_lm_eval_on_the_export_scores_as_our_harness(hf_run: tuple, tmp_path: Path) -> None:
    """lm_eval's own HF model on the exported directory (its tokenizer adds the BOS, which is
    also its prefix for an empty context) and our harness on the run: the same log-likelihoods
    for contexts, an empty context and rolling (perplexity) requests."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from pretrain.evaluation.harness import PretrainLM
    from pretrain.export import export_hf
    from pretrain.pretrained import load_pretrained

    _, _, run_dir = hf_run
    out = export_hf(run_dir, tmp_path / "hf")
    theirs = HFLM(pretrained=str(out), device="cpu", dtype="float32", batch_size=2)
    p = load_pretrained(run_dir)
    ours = PretrainLM(p.model, p.tokenizer, p.config.block_size, batch_size=2)
    assert ours.prefix_token_id == theirs.prefix_token_id == p.tokenizer.bos_id
    assert ours.tok_encode("def f(x):") == theirs.tok_encode("def f(x):")

    pairs = [("def f(x):", " return x"), ("", "import os"), ("class A:\n", "    pass")]
    requests = [
        Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)
    ]  # fmt: skip
    rolling = [Instance("loglikelihood_rolling", {}, ("x = 1\ny = 2\n",), 0)]
    for a, b in zip(ours.loglikelihood(requests), theirs.loglikelihood(requests)):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(
        theirs.loglikelihood_rolling(rolling)[0], abs=1e-4
    )
