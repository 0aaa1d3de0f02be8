"""The open model families, read and written exactly: GPT-2, Llama (plain RoPE and Llama 3.x's
llama3 rule in both config forms), SmolLM2, Qwen2/2.5, Qwen3, Mistral.

Every source is a model transformers builds from a small config (`tests.hf_families`, nothing
downloaded). Each one is read through `pretrain.pretrained.load_pretrained` and checked against
stock transformers: logits on held-out text, greedy generation, the loss over every embedding
row; then written back (`hf.save_hf`, and `pretrain.export --format hf` from a checkpoint) and
read by stock `AutoModelForCausalLM` as the same class, with the source's config."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pretrain import hf
from pretrain.data.shards import read_manifest, read_shard
from pretrain.model import GPTConfig, rope_frequencies
from pretrain.pretrained import (
    SourceError,
    architecture_mismatches,
    load_pretrained,
    weights_for,
)
from tests.hf_families import (
    FAMILIES,
    QWEN_ROWS,
    VOCAB,
    WINDOW,
    hf_config,
    model_overrides,
    save_hf_model,
)

REPO = Path(__file__).resolve().parents[2]
NAMES = sorted(FAMILIES)
# fp32 logits of 2-layer, 32-48-wide models: both sides run the same matmuls on the same
# weights (a few hundred terms per dot product); summation orders differ by ~1e-7.
ATOL = 1e-5
# Config keys an export does not copy from the source, and why: special ids come from the
# run's tokenizer (checked apart), dropout is a training choice (ours is 0), the dtype is the
# export's, and GPT-2's gelu_new is written as gelu_pytorch_tanh (the same function).
NOT_COPIED = {
    "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
    "transformers_version", "attn_pdrop", "embd_pdrop", "resid_pdrop", "activation_function",
}  # fmt: skip


@pytest.fixture(scope="module")
def val_ids(tiny_data: Path) -> torch.Tensor:
    """[2, 64] held-out token ids: the first 64 tokens of the two longest val documents."""
    manifest = read_manifest(tiny_data)
    docs = [d for s in manifest.shards("val") for d, _ in read_shard(manifest, s)]
    docs = sorted(docs, key=len, reverse=True)[:2]
    return torch.tensor(np.stack([d[:64] for d in docs]).astype(np.int64))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family saved by save_pretrained, without a tokenizer."""
    root = tmp_path_factory.mktemp("families")
    return {name: save_hf_model(name, root / name) for name in NAMES}


def stock(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", NAMES)
def test_read_logits_and_greedy_generation_equal_transformers(
    name: str, sources: dict[str, Path], val_ids: torch.Tensor
) -> None:
    theirs = stock(sources[name])
    p = load_pretrained(sources[name])
    assert p.kind == "hf" and p.tokenizer is None
    rows = theirs.config.vocab_size
    assert p.config.vocab_size == rows  # the embedding's rows, not the tokenizer's ids
    T = min(val_ids.size(1), p.config.block_size)  # Mistral's window caps the positions
    x = val_ids[:, :T]
    with torch.no_grad():
        ours_logits, theirs_logits = p.model(x)[0][..., :rows], theirs(x).logits
    assert ours_logits.shape == theirs_logits.shape
    assert (ours_logits - theirs_logits).abs().max().item() <= ATOL

    # Greedy generation: our KV-cached loop (what pretrain.sample runs) against transformers'.
    prompt, n_new = x[:1, : T // 2], T - T // 2
    eos = theirs.generation_config.eos_token_id
    hf_out = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False,
        pad_token_id=eos,
    )  # fmt: skip
    our_out = p.model.generate(prompt, n_new, temperature=0.0, eos_id=eos)
    assert our_out[0].tolist() == hf_out[0].tolist()
    assert len(our_out[0]) > prompt.size(1)


def test_both_rope_config_forms_read_the_same_llama3_frequencies(
    sources: dict[str, Path],
) -> None:
    """transformers 5's rope_parameters and the older top-level rope_theta + rope_scaling
    give one config, and our llama3 rule gives transformers' frequencies bit for bit."""
    new, old = (load_pretrained(sources[n]).config for n in ("llama3", "llama3-legacy"))
    assert json.loads((sources["llama3-legacy"] / "config.json").read_text())["rope_scaling"]
    assert new == old
    assert new.rope_scaling == "llama3" and new.rope_factor == 8.0
    inv_freq = stock(sources["llama3"]).model.rotary_emb.inv_freq
    ours = rope_frequencies(new)
    assert torch.equal(ours, inv_freq)
    # The rule's three bands are all there: kept, stretched rope_factor times, blended.
    plain = rope_frequencies(replace(new, rope_scaling="none"))
    kept, stretched = ours == plain, torch.isclose(ours, plain / new.rope_factor)
    assert kept.any() and stretched.any() and (~kept & ~stretched).any()


def exported_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_written_back_as_the_same_class_and_config(
    name: str, sources: dict[str, Path], val_ids: torch.Tensor, tiny_data: Path, tmp_path: Path
) -> None:
    p = load_pretrained(sources[name])
    out = hf.save_hf(
        p.config, p.model.state_dict(), tmp_path / "out", tiny_data / "tokenizer.model"
    )
    # The older rope form is written back in transformers 5's, as save_pretrained writes it.
    same = "llama3" if name == "llama3-legacy" else name
    src_cfg, out_cfg = exported_config(sources[same]), exported_config(out)
    if name == "mistral":  # read with its positions capped at the window (see pretrain.hf)
        assert out_cfg.pop("max_position_embeddings") == out_cfg["sliding_window"] == WINDOW
        src_cfg.pop("max_position_embeddings")
    if name == "gpt2":
        assert out_cfg["activation_function"] in hf.GPT2_GELUS
    for key in sorted(set(src_cfg) | set(out_cfg)):
        if key not in NOT_COPIED:
            assert out_cfg.get(key) == src_cfg.get(key), key
    # Special ids are the tokenizer's (our sentencepiece model: EOS 2, pad 3; BOS = EOS).
    assert (out_cfg["eos_token_id"], out_cfg["bos_token_id"], out_cfg["pad_token_id"]) == (2, 2, 3)

    theirs = stock(out)
    assert type(theirs).__name__ == src_cfg["architectures"][0]
    assert not out_cfg.get("auto_map")  # a stock class: no remote code
    T = min(val_ids.size(1), p.config.block_size)
    with torch.no_grad():
        a = p.model(val_ids[:, :T])[0][..., : p.config.vocab_size]
        b = theirs(val_ids[:, :T]).logits
    assert (a - b).abs().max().item() <= ATOL


def test_vocabulary_rows_beyond_the_tokenizer_are_kept_exactly(sources: dict[str, Path]) -> None:
    """Qwen's embedding has more rows than its tokenizer has ids: every row is in
    transformers' softmax, so every row is in ours (vocab_size = rows, padding beyond)."""
    p = load_pretrained(sources["qwen2"])
    cfg = p.config
    assert cfg.vocab_size == QWEN_ROWS > VOCAB and cfg.padded_vocab_size > QWEN_ROWS
    theirs = stock(sources["qwen2"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, QWEN_ROWS, (2, 33), generator=g)  # ids past the tokenizer's too
    with torch.no_grad():
        ours = p.model(x[:, :-1], x[:, 1:])[1]
        ref = theirs(x, labels=x).loss  # transformers shifts the labels itself
    assert ours is not None
    assert abs(ours.item() - ref.item()) <= ATOL
    # Another padding for a new run: the same rows; fewer rows than the source's: refused.
    from pretrain.model import GPT

    for pad in (1, 128):
        target = replace(cfg, pad_vocab_to=pad)
        model = GPT(target).eval()
        model.load_state_dict(weights_for(p, target))
        with torch.no_grad():
            assert torch.equal(model(x)[0][..., :QWEN_ROWS], p.model(x)[0][..., :QWEN_ROWS])
    with pytest.raises(SourceError, match=f"model.vocab_size={QWEN_ROWS}"):
        weights_for(p, replace(cfg, vocab_size=VOCAB))


def test_export_from_a_checkpoint_with_a_hugging_face_tokenizer(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """`pretrain.export --format hf` of a run whose tokenizer is a Hugging Face one (a Qwen
    continued): the source's class, the tokenizer's files as they are, its special ids."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from transformers import AutoTokenizer

    from pretrain import checkpoint
    from pretrain.export import main
    from pretrain.tokenizer import load_tokenizer
    from tests.hf_tokenizers import build

    tok_dir = build("qwen", tmp_path / "run" / "tokenizer")  # where a run keeps an HF one
    tok = load_tokenizer(tok_dir)
    rows = tok.vocab_size + 24  # more rows than ids, as Qwen's
    src = save_hf_model("qwen2", tmp_path / "src", vocab_size=rows)
    p = load_pretrained(src)
    ckpt = checkpoint.save(
        tmp_path / "run" / "checkpoints", 1, {"model": get_model_state_dict(p.model)},
        {"step": 1}, {"model": asdict(p.config)}, keep_last=1,
    )  # fmt: skip
    assert main([str(tmp_path / "run"), str(tmp_path / "out"), "--format", "hf"]) == 0
    out = tmp_path / "out"
    cfg = exported_config(out)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["vocab_size"] == rows
    assert cfg["eos_token_id"] == tok.eos_id and cfg["bos_token_id"] is None  # Qwen: no BOS
    for f in tok.files:  # copied as they are
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    theirs = stock(out)
    x = torch.randint(0, rows, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (p.model(x)[0][..., :rows] - theirs(x).logits).abs().max().item() <= ATOL
    text = "def f(x):\n    return x + 1  # \u00e9"
    assert AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == (
        tok.encode(text)
    )
    assert ckpt.is_dir()

    # Into the same directory again: refused, unless --overwrite, which leaves nothing stale
    # (here: the shard index of an earlier export with smaller shards).
    (out / "model.safetensors.index.json").write_text("{}")
    (out / "notes.txt").write_text("the user's")
    assert main([str(tmp_path / "run"), str(out), "--format", "hf"]) == 1
    assert (out / "model.safetensors.index.json").exists()
    assert main([str(tmp_path / "run"), str(out), "--format", "hf", "--overwrite"]) == 0
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "notes.txt").read_text() == "the user's"  # not an export's file: kept
    assert exported_config(out)["architectures"] == ["Qwen2ForCausalLM"]


# ---- what is not read, and why ---------------------------------------------------------------

REFUSED = [
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                    "original_max_position_embeddings": 32}), "rope_type='yarn'"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='linear'"),
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                    "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    ("llama", dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
     "use_sliding_window=True"),
    ("gpt2", dict(activation_function="relu"), "activation_function='relu'"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "change", "blamed"), REFUSED)
def test_unsupported_configs_are_refused_in_one_line(name: str, change: dict, blamed: str) -> None:
    with pytest.raises(hf.HFError) as e:
        hf.from_hf_config(hf_config(name, **change))
    msg = str(e.value)
    assert blamed in msg and "\n" not in msg
    assert all(f"{t} ({f.cls})" in msg for t, f in hf.FAMILIES.items())  # what is read


def test_unsupported_model_types_are_refused_in_one_line(tmp_path: Path) -> None:
    from transformers import AutoConfig

    with pytest.raises(hf.HFError, match="model_type 'gemma'") as e:
        hf.from_hf_config(AutoConfig.for_model("gemma", vocab_size=64, hidden_size=32))
    assert "qwen3 (Qwen3ForCausalLM)" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(SourceError, match="model_type 'no-such-model'.*mistral"):
        load_pretrained(tmp_path)


def test_a_window_that_could_bind_caps_the_positions(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """Mistral's window (16 < 64 positions): sequences of at most 16 get the full causal mask,
    so the model reads with block_size 16, refuses longer ones, and keeps its window; a window
    no sequence reaches is kept as it is. A config whose window binds is refused."""
    p = load_pretrained(sources["mistral"])
    assert (p.config.block_size, p.config.sliding_window) == (WINDOW, WINDOW)
    with pytest.raises(ValueError, match="sliding_window"):
        p.model(torch.zeros(1, WINDOW + 1, dtype=torch.long))
    wide = load_pretrained(save_hf_model("mistral", tmp_path / "wide", sliding_window=128))
    assert (wide.config.block_size, wide.config.sliding_window) == (64, 128)
    assert hf.to_hf_config(wide.config, eos_id=2, pad_id=-1).sliding_window == 128
    with pytest.raises(ValueError, match="the window would bind"):
        replace(p.config, block_size=WINDOW + 1).validate()
    # A Qwen window on some layers that no position reaches: read (it never binds).
    qwen = hf.from_hf_config(
        hf_config("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    )
    assert qwen.block_size == 64 and qwen.sliding_window == 0


# ---- the model type an export writes ---------------------------------------------------------


def test_model_type_is_derived_or_recorded(sources: dict[str, Path]) -> None:
    read = {name: load_pretrained(sources[name]).config for name in NAMES}
    # Derived from the options wherever they say it; recorded where they do not.
    assert read["mistral-nowindow"].hf_model_type == "mistral"
    assert all(read[n].hf_model_type == "" for n in NAMES if n != "mistral-nowindow")
    for name in NAMES:
        assert hf.family(read[name]) == FAMILIES[name][0], name
    # An explicit type the options do not fit is refused, naming the option.
    with pytest.raises(hf.HFError, match=r"Qwen2ForCausalLM is prevented by qkv_bias=False"):
        hf.family(replace(read["llama"], hf_model_type="qwen2"))
    # init_from: model.* must say the source's class too (named once the options agree).
    target = replace(read["mistral-nowindow"], hf_model_type="")
    assert architecture_mismatches(read["mistral-nowindow"], target) == [
        ("hf_model_type", "llama", "mistral")
    ]
    bad = architecture_mismatches(read["qwen3"], replace(read["qwen3"], qk_norm=False))
    assert [k for k, _, _ in bad] == ["qk_norm"]  # not the export type that follows from it


PRESETS = ("llama3.2-1b", "llama3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "smollm2-135m")


def preset(name: str) -> GPTConfig:
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(
        OmegaConf.structured(GPTConfig), OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, GPTConfig)
    return cfg.validate()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_the_published_shapes_transformers_builds(name: str) -> None:
    """Each preset maps to its family's config and back unchanged, and transformers' model of
    that config (on the meta device) has our parameter count and tensor shapes."""
    from transformers import AutoModelForCausalLM

    from pretrain.model import GPT

    cfg = preset(name)
    hc = hf.to_hf_config(cfg, eos_id=0, pad_id=-1)
    assert hc.model_type == cfg.hf_model_type
    assert hf.from_hf_config(hc) == replace(cfg, hf_model_type="")  # derived again
    with torch.device("meta"):
        theirs = AutoModelForCausalLM.from_config(hc)
        ours = GPT(cfg)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    mapped = hf.to_hf_state_dict(cfg, dict(ours.state_dict()), torch.float32)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: s for k, s in theirs_shapes.items() if not (cfg.tie_embeddings and k == "lm_head.weight")
    }


def test_old_checkpoints_configs_build_the_same_network() -> None:
    """A config.yaml written before these options existed lacks their keys: the defaults are
    today's network (no new parameters, same names and shapes)."""
    from pretrain.model import GPT

    for fields in (
        dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32),
        dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
             norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False),
    ):  # fmt: skip
        old = GPTConfig(**fields)
        assert hf.family(old) in ("gpt2", "llama")
        torch.manual_seed(0)
        model = GPT(old)
        names = {k for k, _ in model.named_parameters()}
        assert not any("q_norm" in k or "k_norm" in k for k in names)
        assert all(
            m.bias is None or old.bias for n, m in model.named_modules() if n.endswith("c_attn")
        )
        x = torch.randint(0, 61, (1, 16))
        explicit = GPT(GPTConfig(**fields, qkv_bias=False, qk_norm=False, rope_scaling="none"))
        explicit.load_state_dict(model.state_dict())
        assert torch.equal(explicit(x)[0], model(x)[0])


def test_weights_for_keeps_every_family_tensor(sources: dict[str, Path]) -> None:
    """`train.init_from` takes the q/k norm gains and q/k/v biases with the rest."""
    for name, key in (("qwen3", "attn.q_norm.weight"), ("qwen2", "attn.c_attn.bias")):
        p = load_pretrained(sources[name])
        sd = weights_for(p, p.config)
        assert torch.equal(
            sd[f"transformer.h.1.{key}"], p.model.state_dict()[f"transformer.h.1.{key}"]
        )


@pytest.mark.parametrize("name", ["llama3", "qwen3", "mistral-nowindow"])
def test_model_overrides_say_the_sources_architecture(name: str, sources: dict[str, Path]) -> None:
    """The overrides a `train.init_from=<HF dir>` run takes (tests.hf_families), applied to
    the default model config, pass the init_from architecture check."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(
        OmegaConf.structured(GPTConfig), OmegaConf.from_dotlist(
            [o.removeprefix("model.") for o in model_overrides(sources[name])]
        )
    )  # fmt: skip
    target = OmegaConf.to_object(merged)
    assert isinstance(target, GPTConfig)
    source = load_pretrained(sources[name]).config
    assert architecture_mismatches(source, target) == []
    assert architecture_mismatches(source, GPTConfig(vocab_size=source.vocab_size)) != []
