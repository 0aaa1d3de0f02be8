"""`train.init_from`: a new run from trained weights, under every strategy family (single, and
ddp, zero3, fsdp at 2 real ranks), from our own run and from Hugging Face directories of the
open families (Llama 3, Qwen2, Qwen3, Mistral) that transformers builds here, each with its own
kind of tokenizer and data prepared with it; and the HF export of the zero3 and fsdp
checkpoints those runs write.

The check that matters: the first step's loss (logged before any update) equals the source
model's loss on the same batch, computed here by replaying the run's data loader, with the
source's own code (our GPT for a run, transformers' model for an HF directory). The runs from
HF directories restate no `model.*`: the architecture comes from the source."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pretrain import checkpoint
from pretrain.data.loader import TokenLoader
from pretrain.metrics import read_metrics
from pretrain.model import GPT, GPTConfig
from tests.conftest import REPO, torchrun
from tests.distributed.test_strategies import env

# fp32 losses of the debug model (2 layers, 64 wide) over 2 x 4 x 64 tokens: the source and the
# run compute the same sums, in other orders where a strategy gathers or shards; a few
# roundings of 2**-24 each, so 1e-5 relative has a wide margin.
REL = 1e-5


def cli(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "-m", "pretrain.train", "experiment=debug", f"data.dir={data}", f"run.dir={run}",
        "train.micro_batch=4", "train.global_batch_tokens=512", "checkpoint.every=100",
        "train.eval_batches=0", "dist.timeout_s=120", *extra,
    ]  # fmt: skip


def single(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# (name, world size, strategy, source, extra overrides). A family source is paired with the
# kind of tokenizer its models ship (tests/hf_tokenizers.py): byte-level BPE that adds a BOS
# (Llama 3), byte-level without one (Qwen), sentencepiece-derived (Mistral).
RUNS = [
    ("single-llama3", 0, "single", "llama3", ["logging.wandb=true", "logging.wandb_mode=offline"]),
    ("ddp-qwen2", 2, "ddp", "qwen2", []),
    ("zero3-qwen3", 2, "zero3", "qwen3", []),
    ("fsdp-mistral", 2, "fsdp", "mistral-nowindow", []),
    ("ddp-from-run", 2, "ddp", "run", []),
    ("zero3-from-run", 2, "zero3", "run", []),
]
TOKENIZER = {"llama3": "llama3", "qwen2": "qwen", "qwen3": "qwen", "mistral-nowindow": "llama2"}
QWEN_EXTRA_ROWS = 8  # Qwen's embedding has more rows than its tokenizer has ids


@pytest.fixture(scope="module")
def sources(
    tiny_data: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A run trained 30 steps (GPT-2 mode) on the tiny data; and an HF directory per family
    (random weights, built by transformers: nothing can be downloaded) holding its kind of
    tokenizer, with a data dir prepared by that tokenizer next to it (`data_of`)."""
    from pretrain.prepare import TokenizerConfig, run_prepare
    from pretrain.tokenizer import load_tokenizer
    from tests.data_fixtures import tiny_config
    from tests.hf_families import save_hf_model
    from tests.hf_tokenizers import build

    root = tmp_path_factory.mktemp("init_sources")
    single(cli(tiny_data, root / "run", "train.max_steps=30", "train.global_batch_tokens=0"))
    out = {"run": root / "run"}
    for kind in sorted(set(TOKENIZER.values())):
        tok = build(kind, root / f"tok-{kind}")
        cfg = tiny_config(
            tiny_corpus, root / f"data-{kind}", tokenizer=TokenizerConfig(path=str(tok))
        )
        out[f"data-{kind}"] = run_prepare(cfg)
        out[f"tok-{kind}"] = tok
    for family, kind in TOKENIZER.items():
        tok = load_tokenizer(out[f"tok-{kind}"])
        rows = tok.vocab_size + (QWEN_EXTRA_ROWS if family.startswith("qwen") else 0)
        bos = tok.bos_id if tok.bos_id >= 0 else tok.eos_id
        src = save_hf_model(family, root / family, vocab_size=rows, bos_token_id=bos,
                            eos_token_id=tok.eos_id, max_position_embeddings=128)  # fmt: skip
        for f in tok.files:  # the tokenizer travels with the model, as on the hub
            shutil.copy(f, src / f.name)
        if family == "mistral-nowindow":  # as an instruct model's hub files: ids its
            # tokenizer does not give (a pad id, a second EOS), a sampling default, a template
            hf_cfg = json.loads((src / "config.json").read_text())
            (src / "config.json").write_text(json.dumps({**hf_cfg, "pad_token_id": 0}))
            gen = json.loads((src / "generation_config.json").read_text())
            gen.update(eos_token_id=[tok.eos_id, 0], temperature=0.6, do_sample=True)
            (src / "generation_config.json").write_text(json.dumps(gen))
            (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")  # fmt: skip
        out[family] = src
    return out


def data_of(name: str, sources: dict[str, Path], tiny_data: Path) -> Path:
    src = next(r[3] for r in RUNS if r[0] == name)
    return sources[f"data-{TOKENIZER[src]}"] if src in TOKENIZER else tiny_data


@pytest.fixture(scope="module")
def started(
    tiny_data: Path, sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("init_runs")
    out = {}
    for name, nproc, strategy, src, extra in RUNS:
        data = data_of(name, sources, tiny_data)
        args = cli(data, root / name, f"strategy={strategy}", "train.max_steps=2",
                   f"train.init_from={sources[src]}", *extra)  # fmt: skip
        proc = torchrun(nproc, args, env=env(), timeout=400) if nproc else single(args)
        assert "weights from" in proc.stdout, proc.stdout[-3000:]
        if strategy == "zero3":
            assert "FSDP equivalent" not in proc.stdout  # DeepSpeed ran
        out[name] = root / name
    return out


def first_batches(data: Path, run: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (x, y) micro-batch of step 1 of `run`, all ranks, replayed from its loader."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ws = 2 if cfg["strategy"]["name"] != "single" else 1
    micro, seq = cfg["train"]["micro_batch"], cfg["train"]["seq_len"]
    accum = cfg["train"]["global_batch_tokens"] // (micro * seq * ws)
    out = []
    for r in range(ws):
        loader = TokenLoader(data, "train", seq, micro, rank=r, world_size=ws,
                             seed=cfg["data"]["seed"], num_workers=0,
                             partitions=cfg["data"]["partitions"])  # fmt: skip
        it = iter(loader)
        out += [next(it) for _ in range(accum)]
    return out


def source_loss(src: Path, batches: list) -> float:
    """The mean of the source's per-micro-batch losses (what step 1 logs), by its own code."""
    losses = []
    if (src / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(src).eval()
        for x, y in batches:
            with torch.no_grad():
                logits = hf(x).logits
            losses.append(
                float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
            )
    else:
        model = GPT(GPTConfig(**checkpoint.read_config(src)["model"]))
        model.load_state_dict(checkpoint.load_model_weights(src))
        model.eval()
        for x, y in batches:
            with torch.no_grad():
                losses.append(float(model(x, y)[1]))
    return sum(losses) / len(losses)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_first_step_loss_is_the_sources(
    name: str, started: dict[str, Path], sources: dict[str, Path], tiny_data: Path
) -> None:
    run = started[name]
    src = sources[next(r[3] for r in RUNS if r[0] == name)]
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]  # step 0 again: a new run, not a resumed one
    expected = source_loss(src, first_batches(data_of(name, sources, tiny_data), run))
    assert rows[0]["loss"] == pytest.approx(expected, rel=REL), (rows[0]["loss"], expected)
    if src.name == "run":  # trained weights, not a fresh init (ln 512 = 6.24 nats)
        assert rows[0]["loss"] < math.log(512) - 0.5
    # A fresh optimizer and schedule: the first step's lr is the warmup's first value.
    from pretrain.optim import lr_at

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert rows[0]["lr"] == pytest.approx(lr_at(0, 2, cfg["optim"]["lr"], _schedule(cfg)))
    # The source is recorded as what was loaded (a run dir resolves to its checkpoint).
    want = checkpoint.resolve(src) if src.name == "run" else src
    assert cfg["train"]["init_from"] == str(want.resolve())
    saved = checkpoint.read_config(run)
    assert saved["train"]["init_from"] == str(want.resolve())
    if (src / "config.json").is_file():  # built as the source, no model.* restated
        from pretrain.pretrained import architecture_mismatches, source_config

        assert architecture_mismatches(source_config(src), GPTConfig(**cfg["model"])) == []
    if (run / "wandb").is_dir():  # and in W&B's own record of the run's config
        from tests.wandb_offline import find_offline_run, read_config

        assert read_config(find_offline_run(run / "wandb"))["train"]["init_from"] == str(want)


def _schedule(cfg: dict) -> object:
    from pretrain.config import ScheduleConfig

    return ScheduleConfig(**cfg["schedule"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["zero3-from-run", "fsdp-mistral"])
def test_hf_export_of_two_rank_checkpoints(
    name: str, started: dict, sources: dict[str, Path], tmp_path: Path
) -> None:
    """Checkpoints written by zero3 and fsdp at 2 ranks export to HF; transformers' logits on
    val text equal ours from the same checkpoint. A run started from a Mistral directory is
    written back as a Mistral, with the source's own tokenizer files."""
    from transformers import AutoModelForCausalLM

    from pretrain.data.shards import read_manifest, read_shard
    from pretrain.export import export_hf

    run = started[name]
    ckpt = checkpoint.resolve(run)
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["strategy"]["name"] in name
    out = export_hf(ckpt, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = GPT(GPTConfig(**checkpoint.read_config(ckpt)["model"]))
    ours.load_state_dict(checkpoint.load_model_weights(ckpt))
    ours.eval()
    data = Path(checkpoint.read_config(ckpt)["data"]["dir"])
    manifest = read_manifest(data)
    docs = [d for s in manifest.shards("val") for d, _ in read_shard(manifest, s)]
    x = torch.tensor(np.stack([d[:128] for d in docs if len(d) >= 128][:2]).astype(np.int64))
    with torch.no_grad():
        b = theirs(x).logits
        a = ours(x)[0][..., : b.shape[-1]]  # our padded rows (-inf) are not exported
    # fp32 logits, same weights, <= 128-term dot products: ~1e-7 apart.
    assert (a - b).abs().max().item() <= 1e-5
    if name == "fsdp-mistral":
        assert type(theirs).__name__ == "MistralForCausalLM"
        tok = sources["tok-llama2"]
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert (out / f).read_bytes() == (tok / f).read_bytes(), f
        # The source's special ids, generation defaults and chat template come back.
        src = sources["mistral-nowindow"]
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        mine, its = (json.loads((d / "config.json").read_text()) for d in (out, src))
        assert {k: mine[k] for k in ids} == {k: its[k] for k in ids} and its["pad_token_id"] == 0
        gen = json.loads((out / "generation_config.json").read_text())
        want = json.loads((src / "generation_config.json").read_text())
        assert (gen["eos_token_id"], gen["temperature"]) == (want["eos_token_id"], 0.6)
        assert (out / "chat_template.jinja").read_text() == (
            src / "chat_template.jinja"
        ).read_text()
        assert theirs.generation_config.eos_token_id == want["eos_token_id"]


@pytest.mark.timeout(600)
def test_refusals_and_resume_precedence(
    tiny_data: Path,
    other_tokenizer_data: Path,
    sources: dict[str, Path],
    started: dict[str, Path],
    tmp_path: Path,
) -> None:
    def error_of(proc: subprocess.CompletedProcess) -> str:
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        return proc.stderr.strip().splitlines()[-1]

    src = sources["run"]
    err = error_of(single(cli(tiny_data, tmp_path / "a", f"train.init_from={src}",
                              "model.n_layer=3", "model.bias=false"), check=False))  # fmt: skip
    assert "model.n_layer=3 but the source has 2" in err
    assert "model.bias=False but the source has True" in err
    assert "model.n_layer=2 model.bias=true" in err  # the overrides that fix it
    assert "mlp_hidden" not in err  # not a second problem
    # Data of another tokenizer (and so another vocabulary size): the tokenizer is named as the
    # cause, not model.vocab_size (the same check as pretrain.eval's CLI test, in-process here).
    from pretrain.data.shards import read_manifest
    from pretrain.pretrained import SourceError, load_for_init

    other = read_manifest(other_tokenizer_data)
    target = GPTConfig(**{**checkpoint.read_config(src)["model"], "vocab_size": other.vocab_size})
    with pytest.raises(SourceError, match="trained with another tokenizer") as e:
        load_for_init(str(src), target, other)
    assert "tokenizer.path=" in str(e.value) and "vocab_size" not in str(e.value)
    # Nothing was written for a refused run.
    assert not (tmp_path / "a" / "checkpoints").exists()

    # An HF source: a model.* key set on the command line that contradicts it is named.
    qwen3, qwen_data = sources["qwen3"], sources["data-qwen"]
    err = error_of(single(cli(qwen_data, tmp_path / "b", f"train.init_from={qwen3}",
                              "model.qk_norm=false", "model.dropout=0.1"), check=False))  # fmt: skip
    assert "model.qk_norm=False but the source has True" in err
    assert "dropout" not in err  # a training choice, not architecture
    # ... and data prepared with another tokenizer names both and the command that fixes it.
    err = error_of(single(cli(tiny_data, tmp_path / "c", f"train.init_from={qwen3}"), check=False))
    assert "sentencepiece" in err and "hf" in err
    assert (
        f"python -m pretrain.prepare input=<your corpus> output=<new dir> tokenizer.path={qwen3}"
        in err
    )
    # A source without a tokenizer cannot vouch for the data's ids: refused too.
    bare = tmp_path / "bare-qwen3"
    shutil.copytree(
        qwen3, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json")
    )
    err = error_of(single(cli(qwen_data, tmp_path / "d", f"train.init_from={bare}"), check=False))
    assert f"{bare} has no tokenizer" in err
    # A refused start writes nothing into its run dir (no config, no tokenizer copy), so the
    # same command succeeds once the cause is fixed.
    for refused in ("b", "c", "d"):  # (Hydra makes the directory itself: it stays empty)
        assert not list((tmp_path / refused).glob("*")), refused

    # A requeued job with the same command continues its own checkpoint: init_from is for
    # the start of a run only (and the source is not needed again).
    run = started["single-llama3"]
    args = cli(sources["data-llama3"], run, "strategy=single", "train.max_steps=3",
               f"train.init_from={sources['llama3']}")  # fmt: skip
    shutil.move(sources["llama3"], tmp_path / "moved")
    try:
        out = single(args)
    finally:
        shutil.move(tmp_path / "moved", sources["llama3"])
    assert "resumed from" in out.stdout and "weights from" not in out.stdout
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
