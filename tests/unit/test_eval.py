"""`pretrain.eval`'s pieces: the windows that score a split, their batching, the lm_eval
adapter's scoring, the shipped task's data, the config parser; `pretrain.pretrained`'s checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import ConfigError
from pretrain.eval import parse_args
from pretrain.evaluation.harness import PretrainLM
from pretrain.evaluation.split import score_windows, windows
from pretrain.model import GPT, GPTConfig
from pretrain.pretrained import (
    Pretrained,
    SourceError,
    architecture_mismatches,
    detect,
    weights_for,
)
from pretrain.tokenizer import SentencePieceText

CFG = dict(vocab_size=512, block_size=16, n_layer=2, n_head=2, n_embd=16, pad_vocab_to=96)


def tiny_model(**kw: object) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**dict(CFG, **kw))).eval()


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
def test_windows_predict_every_token_once_after_eos(n: int) -> None:
    doc = np.arange(10, 10 + n)
    wins = windows(doc, eos_id=2, seq_len=16)
    targets = np.concatenate([t for _, t in wins])
    assert targets.tolist() == doc.tolist()  # every token once, in order
    stream = [2, *doc.tolist()]
    pos = 0
    for x, y in wins:
        assert len(x) == len(y) <= 16
        assert x.tolist() == stream[pos : pos + len(y)]  # each target's own predecessor
        pos += len(y)
    assert wins[0][0][0] == 2


def test_score_does_not_depend_on_batching() -> None:
    model = tiny_model()
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 512, size=n) for n in (3, 16, 17, 40, 9)]
    wins = [w for d in docs for w in windows(d, 2, 16)]
    one_by_one = score_windows(model, wins, batch_tokens=1, device=torch.device("cpu"))
    batched = score_windows(model, wins, batch_tokens=4096, device=torch.device("cpu"))
    # fp32 sums of ~80 log-probs of O(6) nats; batching changes matmul shapes, hence ~1e-6.
    assert batched == pytest.approx(one_by_one, rel=1e-6)
    direct = 0.0
    for x, y in wins:
        with torch.no_grad():
            logits, _ = model(torch.tensor(x)[None])
        direct -= float(logits[0].log_softmax(-1).gather(-1, torch.tensor(y)[:, None]).sum())
    assert one_by_one == pytest.approx(direct, rel=1e-6)


def test_lm_adapter_scores_like_the_model(tiny_data: Path) -> None:
    model = tiny_model()
    tok = SentencePieceText(tiny_data / "tokenizer.model")
    lm = PretrainLM(model, tok, block_size=16, batch_size=3)
    ctx, cont = tok.encode("def f(x):"), tok.encode(" return x")
    long_ctx = list(range(4, 40))  # longer than the block: cut from the left, as HFLM does
    got = lm._loglikelihood_tokens([(None, ctx, cont), (None, long_ctx, cont), (None, [2], cont)])
    for (ll, _), c in zip(got, (ctx, long_ctx, [2])):
        whole = (c + cont)[-17:]
        with torch.no_grad():
            logp = model(torch.tensor(whole[:-1])[None])[0][0].log_softmax(-1)
        ref = sum(float(logp[len(whole) - 1 - len(cont) + i, t]) for i, t in enumerate(cont))
        assert ll == pytest.approx(ref, abs=1e-5)
    assert lm.prefix_token_id == lm.eot_token_id == tok.eos_id  # empty contexts: after EOS


def test_shipped_task_data_is_well_formed() -> None:
    from pretrain.tasks import TASKS_DIR

    rows = [json.loads(s) for s in (TASKS_DIR / "pyline" / "pyline.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200
    labels = [r["label"] for r in rows]
    assert set(labels) == {0, 1, 2, 3}
    for r in rows:
        choices = r["choices"]
        assert len(choices) == len(set(choices)) == 4
        answer = choices[r["label"]]
        indent = len(answer) - len(answer.lstrip(" "))
        assert all(len(c) - len(c.lstrip(" ")) == indent for c in choices)  # no giveaway
        assert r["context"].endswith("\n") and r["context"].count("\n") == 6


def test_shipped_task_loads_in_lm_eval_offline() -> None:
    from lm_eval.tasks import TaskManager

    from pretrain.tasks import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert "pyline" in manager.all_tasks
    task = manager.load_task_or_group(["pyline"])["pyline"]
    docs = list(task.test_docs())
    assert len(docs) == 200
    assert task.doc_to_choice(docs[0]) == docs[0]["choices"]
    assert task.doc_to_target(docs[0]) == docs[0]["label"]


def test_parse_args() -> None:
    cfg = parse_args(["checkpoint=a", "data.dir=b", "tasks=x,y", "limit=3"])
    assert (cfg.checkpoint, cfg.data.dir, cfg.tasks, cfg.limit) == ("a", "b", "x,y", 3)
    with pytest.raises(ConfigError, match="Did you mean 'max_documents'"):
        parse_args(["max_document=3"])
    with pytest.raises(ConfigError, match="seq_len"):
        parse_args(["seq_len=long"])


# ---- pretrained -------------------------------------------------------------------------------


def test_detect(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        detect(tmp_path / "missing")
    with pytest.raises(SourceError, match="holds none of them"):
        detect(tmp_path)
    assert detect(tmp_path / "best") == "checkpoint"  # <run dir>/best: a pointer to resolve
    (tmp_path / "config.json").write_text("{}")
    assert detect(tmp_path) == "hf"
    (tmp_path / "checkpoints").mkdir()
    assert detect(tmp_path) == "checkpoint"


def test_architecture_mismatches_compare_resolved_sizes() -> None:
    a = GPTConfig(**CFG)
    # Defaults spelled out are not differences; dropout, init and padding are not architecture.
    same = GPTConfig(**dict(CFG, n_kv_head=2, mlp_hidden=64, dropout=0.1, init_std=0.01))
    assert architecture_mismatches(a, same) == []
    assert architecture_mismatches(a, GPTConfig(**dict(CFG, pad_vocab_to=8))) == []
    bad = GPTConfig(**dict(CFG, n_layer=3, tie_embeddings=False))
    assert architecture_mismatches(a, bad) == [("n_layer", 3, 2), ("tie_embeddings", False, True)]


@pytest.mark.parametrize("tie", [True, False])
def test_weights_for_another_vocabulary_padding(tie: bool) -> None:
    src = tiny_model(tie_embeddings=tie)
    p = Pretrained("checkpoint", Path("."), src.cfg, src, None)
    target = GPTConfig(**dict(CFG, pad_vocab_to=1, tie_embeddings=tie))
    dst = GPT(target).eval()
    dst.load_state_dict(weights_for(p, target))
    assert (dst.lm_head.weight is dst.transformer.wte.weight) == tie
    x = torch.randint(0, 512, (2, 16))
    # The same 16-term dot products; only the matmul's width differs (512 vs 576 columns).
    torch.testing.assert_close(dst(x)[0], src(x)[0][..., :512], rtol=0, atol=1e-6)


def test_init_from_and_an_explicit_resume_are_refused_together() -> None:
    from pretrain.config import validate
    from tests.unit.test_engine import make_cfg

    with pytest.raises(ConfigError, match="both name weights to start from"):
        validate(make_cfg("train.init_from=/a/run", "checkpoint.resume=/b/ckpt"))
    validate(make_cfg("train.init_from=/a/run"))  # resume=auto: a requeued job resumes
    validate(make_cfg("train.init_from=/a/run", "checkpoint.resume=none"))


def test_non_finite_results_exit_non_zero_and_stay_valid_json(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint whose weights hold NaN: the JSON line parses (null for NaN), the exit status
    is 1 and one error line says which figures and what to do."""
    import shutil
    from dataclasses import asdict

    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from pretrain import checkpoint
    from pretrain.data import read_manifest
    from pretrain.eval import main

    model = tiny_model(vocab_size=read_manifest(tiny_data).vocab_size)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    run = tmp_path / "run"
    checkpoint.save(
        run / "checkpoints", 1, {"model": get_model_state_dict(model)}, {"step": 1},
        {"model": asdict(model.cfg), "data": {"dir": str(tiny_data)}}, keep_last=1,
    )  # fmt: skip
    shutil.copy(tiny_data / "tokenizer.model", run / "tokenizer.model")
    assert main([f"checkpoint={run}", f"data.dir={tiny_data}", "max_documents=2"]) == 1
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loss"] is None and result["ppl"] is None
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "loss" in errors[0] and "not finite" in errors[0]
