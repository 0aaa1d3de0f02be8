"""`pretrain.hf`: our GPT <-> stock transformers classes, and tokenizer.json from sentencepiece.

Every mapping is checked against transformers itself: the directory `save_hf` writes is read
back with `AutoModelForCausalLM` / `AutoTokenizer` (offline, no remote code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain import hf
from pretrain.data.shards import read_manifest, read_shard
from pretrain.model import GPT, GPTConfig
from pretrain.tokenizer import SentencePieceText, hf_tokenizer

VOCAB = 512  # tests/data_fixtures.py TINY_VOCAB
# pad_vocab_to=96: 512 ids get 64 padded rows (masked in ours, dropped in the export).
BASE = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32, pad_vocab_to=96)
GPT2 = dict(BASE)
LLAMA = dict(BASE, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, rope_theta=500.0)
VARIANTS = {
    "gpt2-tied": GPT2,
    "gpt2-untied-nobias": dict(GPT2, tie_embeddings=False, bias=False, mlp_hidden=96),
    "llama-gqa-tied": dict(LLAMA, n_kv_head=2),
    "llama-untied-bias": dict(LLAMA, n_kv_head=1, tie_embeddings=False, bias=True),
    "llama-mha": dict(LLAMA, tie_embeddings=False, norm_eps=1e-6),
}
# fp32 logits of a 2-layer, 32-wide model: both sides run the same matmuls on the same weights,
# a few hundred terms per dot product; summation-order differences are ~1e-7 at logits of O(1).
ATOL = 1e-5


def val_documents(data: Path) -> list[np.ndarray]:
    manifest = read_manifest(data)
    return [d for s in manifest.shards("val") for d, _ in read_shard(manifest, s)]


def perturbed(cfg: dict, seed: int = 0) -> GPT:
    """A GPT whose every parameter (biases and norm gains included) is non-trivial, so a
    mapping that drops or swaps one shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def val_ids(tiny_data: Path) -> torch.Tensor:
    """[4, 64] token ids from the val split (the first 64 tokens of the longest documents)."""
    docs = sorted(val_documents(tiny_data), key=len, reverse=True)[:4]
    return torch.tensor(np.stack([d[:64] for d in docs]).astype(np.int64))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_logits_equal_transformers(
    name: str, tiny_data: Path, val_ids: torch.Tensor, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    cfg = VARIANTS[name]
    ours = perturbed(cfg)
    out = hf.save_hf(ours.cfg, ours.state_dict(), tmp_path / "hf", tiny_data / "tokenizer.model")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = "GPT2LMHeadModel" if cfg.get("pos_emb") != "rope" else "LlamaForCausalLM"
    assert type(theirs).__name__ == expected
    assert ours.cfg.padded_vocab_size > VOCAB == theirs.config.vocab_size  # padding dropped
    with torch.no_grad():
        a = ours(val_ids)[0][..., :VOCAB]
        b = theirs(val_ids).logits
    assert b.shape == a.shape
    assert (a - b).abs().max().item() <= ATOL
    # Ours has the padded ids at -inf, so both are the same 512-way softmax.
    torch.testing.assert_close(
        ours(val_ids)[0].log_softmax(-1)[..., :VOCAB], b.log_softmax(-1), rtol=0, atol=2 * ATOL
    )

    # And back: the HF directory read as our GPT computes the same logits.
    cfg_back, sd_back = hf.load_hf(out)
    for key in ("n_layer", "n_head", "n_embd", "norm", "mlp", "pos_emb", "tie_embeddings", "bias"):
        assert getattr(cfg_back, key) == getattr(ours.cfg, key), key
    assert cfg_back.kv_heads == ours.cfg.kv_heads
    assert cfg_back.mlp_hidden_size == ours.cfg.mlp_hidden_size
    back = GPT(cfg_back).eval()
    back.load_state_dict(sd_back)
    with torch.no_grad():
        c = back(val_ids)[0][..., :VOCAB]
    assert torch.equal(c, a)  # the same weights in the same module: bit for bit


def test_bf16_and_sharded_save(tiny_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = perturbed(LLAMA)
    out = hf.save_hf(
        ours.cfg,
        ours.state_dict(),
        tmp_path / "hf",
        tiny_data / "tokenizer.model",
        dtype="bf16",
        max_shard_size="20KB",
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert theirs.dtype == torch.bfloat16
    w = theirs.model.layers[0].self_attn.q_proj.weight
    ref = ours.transformer.h[0].attn.c_attn.weight[: w.shape[0]].to(torch.bfloat16)
    assert torch.equal(w, ref)  # rounding fp32 -> bf16 once, the same way on both sides
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # known to transformers 4 too
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 3


@pytest.mark.parametrize(
    ("change", "blamed"),
    [
        (dict(pos_emb="rope"), ["pos_emb=rope"]),
        (dict(norm="rmsnorm", mlp="swiglu"), ["norm=rmsnorm", "mlp=swiglu", "pos_emb=learned"]),
        (dict(n_kv_head=2), ["n_kv_head=2"]),
    ],
)
def test_mixed_configs_are_refused_naming_the_options(change: dict, blamed: list[str]) -> None:
    cfg = GPTConfig(**dict(GPT2, **change))
    with pytest.raises(hf.HFError) as e:
        hf.family(cfg)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg
    for option in blamed:
        assert option in msg, (option, msg)


def test_unsupported_hf_configs_are_refused(tmp_path: Path) -> None:
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    with pytest.raises(hf.HFError, match="model_type 'gemma'"):
        hf.from_hf_config(AutoConfig.for_model("gemma", vocab_size=64, hidden_size=32))
    with pytest.raises(hf.HFError, match="activation_function='relu'"):
        hf.from_hf_config(
            GPT2Config(vocab_size=64, n_embd=32, n_head=4, activation_function="relu")
        )
    scaled = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=4,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    )
    with pytest.raises(hf.HFError, match="rope_type='linear'"):
        hf.from_hf_config(scaled)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(hf.HFError, match="model_type 'no-such-model'"):
        hf.load_hf(tmp_path)


# ---- tokenizer ------------------------------------------------------------------------------

AWKWARD = [
    "",
    " ",
    "\t\tindented\twith tabs",
    "a    run   of     spaces",
    "   leading and trailing   ",
    "\n\n\nnewlines\n\n",
    "\r\nwindows\r\nline ends",
    "digits 1234567890 3.14159",
    "unseen: \u00e9\u00e8 \u4e2d\u6587 \u0416 \U0001f389 \u2603 \u00a0nbsp \u200bzwsp",
    "text that spells special tokens: <s> </s> <unk> <pad> <0x41>",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n",
    "\x00\x01 control characters \x7f",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    hf_tokenizer(tiny_data / "tokenizer.model", 64).save_pretrained(out)
    return SentencePieceText(tiny_data / "tokenizer.model"), AutoTokenizer.from_pretrained(out)


def test_tokenizer_ids_equal_sentencepiece_on_every_val_document(
    tiny_data: Path, tokenizers: tuple
) -> None:
    sp, theirs = tokenizers
    docs = val_documents(tiny_data)
    assert len(docs) >= 5
    for doc in docs:
        ids = [int(i) for i in doc[:-1]]  # the stored tokens, without the EOS prepare appends
        text = sp.decode(ids)
        assert sp.encode(text) == ids  # the corpus round-trips through sentencepiece ...
        assert theirs.encode(text, add_special_tokens=False) == ids  # ... and HF gives the same
        assert theirs(text)["input_ids"] == ids  # no BOS/EOS added by default either
        assert theirs.decode(ids) == text


@pytest.mark.parametrize("text", AWKWARD)
def test_tokenizer_on_awkward_strings(text: str, tokenizers: tuple) -> None:
    sp, theirs = tokenizers
    ids = sp.encode(text)
    assert theirs.encode(text, add_special_tokens=False) == ids
    assert theirs.decode(ids) == sp.decode(ids) == text


def test_tokenizer_specials_and_space_marker(tokenizers: tuple) -> None:
    sp, theirs = tokenizers
    assert theirs.eos_token_id == sp.eos_id == 2
    assert theirs.bos_token_id == sp.eos_id  # documents start after EOS (see pretrain.hf)
    assert theirs.pad_token_id == sp.pad_id and theirs.unk_token_id == sp.unk_id
    # Special ids decode to nothing in both when asked to skip them.
    ids = [sp.eos_id, *sp.encode("x y"), sp.eos_id]
    assert theirs.decode(ids, skip_special_tokens=True) == sp.decode(ids) == "x y"
    # U+2581 is sentencepiece's space marker: both read it as a space (the one lossy input).
    marker = "a\u2581b"
    assert theirs.encode(marker, add_special_tokens=False) == sp.encode(marker)
    assert theirs.decode(sp.encode(marker)) == sp.decode(sp.encode(marker)) == "a b"


def test_models_transformers_builds_read_as_ours(val_ids: torch.Tensor, tmp_path: Path) -> None:
    """Not our exports: GPT-2 and Llama checkpoints as transformers itself makes them (its
    defaults: gelu_new, dropout configured, biases, HF's RMSNorm epsilon, another RoPE base)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32,
                                           n_layer=2, n_head=4)),
        "llama": LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        )),
    }  # fmt: skip
    for name, theirs in models.items():
        with torch.no_grad():
            for p in theirs.parameters():  # biases and norm gains away from 0 and 1
                p.add_(torch.randn_like(p) * 0.05)
        theirs.save_pretrained(tmp_path / name)
        cfg, sd = hf.load_hf(tmp_path / name)
        ours = GPT(cfg).eval()
        ours.load_state_dict(sd)
        with torch.no_grad():
            a = ours(val_ids)[0][..., :VOCAB]
            b = theirs.eval()(val_ids).logits
        # gelu_new is the tanh GELU written out in Python: 1e-7 from torch's, within ATOL.
        assert (a - b).abs().max().item() <= ATOL, name
