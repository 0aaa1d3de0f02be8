"""A trained run leaves the project: `pretrain.export --format hf` read by stock transformers and
lm_eval, `pretrain.eval` on a split and on lm-eval tasks, for both model families.

Real CLIs throughout (train, export, eval, lm_eval), offline: nothing is downloaded."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.shards import read_manifest, read_shard
from tests.conftest import REPO, test_env
from tests.integration.test_train import ok, train_cli

LLAMA = (
    "model.norm=rmsnorm", "model.mlp=swiglu", "model.pos_emb=rope", "model.bias=false",
    "model.n_kv_head=2", "model.tie_embeddings=false",
)  # fmt: skip
FAMILIES = {"gpt2": (), "llama": LLAMA}
# fp32 logits of the debug model (2 layers, 64 wide, vocab 512): both sides run the same
# matmuls over <= 256 terms on the same weights; their summation orders differ by ~1e-7.
LOGITS_ATOL = 1e-5
# A choice's log-likelihood sums <= ~40 token log-probs of ~1e-6 error each in fp32.
LL_ATOL = 1e-4


def offline_env() -> dict[str, str]:
    return test_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=offline_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{family: (run dir, its HF export)}: the debug model trained 30 steps in each family."""
    root = tmp_path_factory.mktemp("hf_runs")
    out = {}
    for fam, overrides in FAMILIES.items():
        rd = root / fam
        ok(train_cli(tiny_data, rd, "train.max_steps=30", "checkpoint.every=100", *overrides))
        exported = ok(
            run("-m", "pretrain.export", str(rd), str(root / f"{fam}-hf"), "--format", "hf")
        )
        assert f"wrote {root / f'{fam}-hf'}" in exported.stdout
        out[fam] = (rd, root / f"{fam}-hf")
    return out


def val_docs(data: Path) -> list[np.ndarray]:
    manifest = read_manifest(data)
    return [d for s in manifest.shards("val") for d, _ in read_shard(manifest, s)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_export_loads_in_stock_transformers(fam: str, runs: dict, tiny_data: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.sample import load_model

    rd, hf_dir = runs[fam]
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert type(theirs).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[fam]
    assert not theirs.config.to_dict().get("auto_map")  # stock class, no remote code
    ours, sp = load_model(rd)
    V = theirs.config.vocab_size
    assert V == 512 < ours.cfg.padded_vocab_size or V == ours.cfg.padded_vocab_size == 512

    # Logits on val-split text: whole documents, cut to the block size.
    block = ours.cfg.block_size
    docs = [d for d in val_docs(tiny_data) if len(d) >= block][:4]
    assert len(docs) == 4
    x = torch.tensor(np.stack([d[:block] for d in docs]).astype(np.int64))
    with torch.no_grad():
        a, b = ours(x)[0][..., :V], theirs(x).logits
    assert (a - b).abs().max().item() <= LOGITS_ATOL

    # Greedy generation of 32 tokens: transformers' generate == pretrain.sample's generate.
    prompt_text = sp.decode([int(t) for t in docs[0][:40]])
    ids = tok(prompt_text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == sp.encode(prompt_text)
    hf_out = theirs.generate(ids, max_new_tokens=32, do_sample=False)
    our_out = ours.generate(ids, 32, temperature=0.0, eos_id=sp.eos_id)  # what sample runs
    assert hf_out[0].tolist() == our_out[0].tolist()
    assert len(our_out[0]) == len(ids[0]) + 32  # no early EOS: 32 tokens were compared
    # ... and `pretrain.sample` reads the export as it reads the run, to the same text.
    from pretrain.sample import SampleConfig, sample

    texts = [
        sample(SampleConfig(checkpoint=str(c), prompt=prompt_text, num_samples=1,
                            max_new_tokens=32, temperature=0.0, device="cpu"))
        for c in (rd, hf_dir)
    ]  # fmt: skip
    assert texts[0] == texts[1] == [tok.decode(hf_out[0], skip_special_tokens=True)]


@pytest.mark.timeout(600)
def test_eval_run_and_export_agree_and_match_an_independent_count(
    runs: dict, tiny_data: Path
) -> None:
    from transformers import AutoModelForCausalLM

    rd, hf_dir = runs["llama"]
    from pretrain.eval import EvalConfig, EvalDataConfig, evaluate

    a = last_json(ok(run("-m", "pretrain.eval", f"checkpoint={rd}", f"data.dir={tiny_data}")))
    b = evaluate(EvalConfig(checkpoint=str(hf_dir), data=EvalDataConfig(dir=str(tiny_data))))
    manifest = read_manifest(tiny_data)
    assert a["kind"] == "checkpoint" and b["kind"] == "hf"
    assert a["tokens"] == b["tokens"] == manifest.num_tokens["val"]  # the whole split
    assert a["documents"] == manifest.num_documents["val"]
    for key in ("loss", "ppl", "bits_per_byte"):
        assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    assert a["ppl"] == pytest.approx(math.exp(a["loss"]), rel=1e-12)

    # Independently: transformers' model on the same windows (EOS + document, disjoint chunks
    # of block_size predictions), and the bytes of the decoded documents.
    from pretrain.tokenizer import SentencePieceText

    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    sp = SentencePieceText(tiny_data / "tokenizer.model")
    block = theirs.config.max_position_embeddings
    by_len: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    n_bytes = 0
    for doc in val_docs(tiny_data):
        stream = torch.tensor([sp.eos_id, *doc.tolist()])
        n_bytes += len(sp.decode(doc.tolist()).encode())
        for s in range(0, len(doc), block):
            y = stream[s + 1 : s + 1 + block]
            by_len.setdefault(len(y), []).append((stream[s : s + len(y)], y))
    nll = 0.0
    for group in by_len.values():  # equal-length windows together: no padding needed
        x, y = torch.stack([w[0] for w in group]), torch.stack([w[1] for w in group])
        with torch.no_grad():
            logits = theirs(x).logits
        nll += float(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        )
    assert a["bytes"] == n_bytes
    # fp32 sums over ~35k tokens: a relative error of ~1e-6 at most.
    assert a["loss"] == pytest.approx(nll / a["tokens"], rel=1e-5)
    assert a["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


@pytest.mark.timeout(600)
def test_lm_eval_per_choice_loglikelihoods_equal_ours(runs: dict, tmp_path: Path) -> None:
    """The shipped task through the real `lm_eval` CLI on the HF export, and through
    `pretrain.eval tasks=pyline` on the run: the same requests and the same numbers."""
    from pretrain.tasks import TASKS_DIR

    rd, hf_dir = runs["gpt2"]
    limit = 25
    ok(run("-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={hf_dir},dtype=float32", "--device", "cpu",
           "--tasks", "pyline", "--include_path", str(TASKS_DIR), "--limit", str(limit),
           "--batch_size", "4", "--log_samples", "--output_path", str(tmp_path / "lm_eval")))  # fmt: skip
    [samples_file] = list((tmp_path / "lm_eval").rglob("samples_pyline_*.jsonl"))
    theirs = [json.loads(line) for line in samples_file.read_text().splitlines()]
    proc = ok(run("-m", "pretrain.eval", f"checkpoint={rd}", "tasks=pyline", f"limit={limit}",
                  f"output={tmp_path / 'ours.json'}", timeout=120))  # fmt: skip
    ours = json.loads((tmp_path / "ours.json").read_text())["samples"]["pyline"]
    assert len(theirs) == len(ours) == limit
    by_doc = {s["doc_id"]: s for s in ours}
    worst = 0.0
    for s in theirs:
        mine = by_doc[s["doc_id"]]
        # The same (context, choice) requests (lm_eval's log writes them as {gen_args_i: ...}).
        logged = [(a["arg_0"], a["arg_1"]) for _, a in sorted(s["arguments"].items())]
        assert [tuple(a) for a in mine["arguments"]] == logged
        ll_theirs = [float(r[0][0]) for r in s["resps"]]
        ll_ours = [float(r[0][0]) for r in mine["resps"]]
        assert len(ll_theirs) == len(ll_ours) == 4
        worst = max(worst, *(abs(p - q) for p, q in zip(ll_theirs, ll_ours)))
        assert all(math.isfinite(v) and v < 0 for v in ll_ours)
    assert worst <= LL_ATOL, worst
    acc = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())
    assert last_json(proc)["tasks"]["pyline"]["acc"] == acc["results"]["pyline"]["acc,none"]


# ---- bad input: one clear line each ----------------------------------------------------------


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    from pretrain.eval import main

    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]  # one line, the last
    assert err.endswith(line)
    return line


def test_eval_bad_inputs(
    runs: dict, tiny_data: Path, other_tokenizer_data: Path, tmp_path: Path, capsys
) -> None:
    rd, hf_dir = runs["gpt2"]
    err = error_line(capsys, [f"checkpoint={tmp_path}", f"data.dir={tiny_data}"])
    assert "pass a run directory, a checkpoint" in err and "Hugging Face model directory" in err
    err = error_line(capsys, [f"checkpoint={tmp_path / 'nothing'}", f"data.dir={tiny_data}"])
    assert "does not exist" in err
    for model in (rd, hf_dir):
        err = error_line(capsys, [f"checkpoint={model}", f"data.dir={other_tokenizer_data}"])
        assert "trained with another tokenizer" in err and "tokenizer.path=" in err
    from transformers import AutoConfig, AutoModelForCausalLM

    gemma = tmp_path / "gemma"  # a family pretrain does not read
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gemma", vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    ).save_pretrained(gemma)  # fmt: skip
    err = error_line(capsys, [f"checkpoint={gemma}", f"data.dir={tiny_data}"])
    assert "model_type 'gemma'" in err and "qwen3 (Qwen3ForCausalLM)" in err
    err = error_line(capsys, [f"checkpoint={rd}", "data.dri=x"])
    assert "data.dri" in err and "Did you mean 'data.dir'" in err
    err = error_line(capsys, [f"checkpoint={rd}", "limit=abc"])
    assert "limit" in err and "abc" in err
    err = error_line(capsys, [f"checkpoint={rd}"])
    assert "nothing to evaluate" in err
