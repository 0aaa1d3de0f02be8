"""Tiny Hugging Face models of every family pretrain reads, built by transformers itself from a
config (random weights: nothing is downloaded), the way the hub holds them.

    from tests.hf_families import FAMILIES, hf_model, model_overrides, save_hf_model
    save_hf_model("qwen3", tmp_path / "qwen3")             # -> the directory, ready for
    save_hf_model("qwen2", d, tokenizer=tiny_data / "tokenizer.model")  # init_from, eval, ...
    model_overrides(d)   # ["model.n_layer=2", ...]: model.* of a train.init_from=<d> run

Each entry is (model type, config keyword arguments) at the scale of the tests' debug model
(2 layers, 32 wide, vocabulary `VOCAB` = the tiny data's tokenizer), with what makes its
family differ from plain Llama turned on:

    gpt2           GPT2LMHeadModel as transformers defaults it (gelu_new, biases, tied)
    llama          GQA, untied, plain RoPE with a large theta
    llama3         Llama 3.x: llama3 RoPE scaling in transformers 5's `rope_parameters`
    llama3-legacy  the same in the older form the hub's files have (top-level `rope_theta`,
                   `rope_scaling` with "type"), written into config.json as such
    smollm2        SmolLM2's kind of Llama: tied, 6 query heads sharing 2 key/value heads
    qwen2          Qwen2/2.5: q/k/v biases, tied, more embedding rows than the tokenizer's ids
    qwen3          Qwen3: q/k norm, head_dim (16) apart from hidden / heads (8), tied
    mistral        Mistral with a sliding window (16) shorter than its positions (64): read
                   with block_size capped at the window
    mistral-nowindow  Mistral v0.2+ (no window): Llama's options, so read with hf_model_type

Norm gains and biases are moved off 1 and 0 (`hf_model`), so a mapping that drops or swaps
one shows in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 512  # the tiny data's sentencepiece tokenizer (tests/data_fixtures.py)
QWEN_ROWS = 520  # Qwen's embedding has more rows than its tokenizer has ids
POSITIONS = 64
WINDOW = 16

_LLAMA: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# Scaled to the test's 8-channel heads and 64 positions, so that each of the rule's three
# bands has frequencies in it (kept, stretched 8 times, blended).
_LLAMA3_ROPE = dict(
    rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=32,
)  # fmt: skip
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=2, eos_token_id=2)),
    "llama": ("llama", dict(_LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    "llama3": ("llama", dict(_LLAMA, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", **_LLAMA3_ROPE})),
    "llama3-legacy": ("llama", dict(_LLAMA, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "llama3", **_LLAMA3_ROPE})),
    "smollm2": ("llama", dict(_LLAMA, hidden_size=48, num_attention_heads=6, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e5})),
    "qwen2": ("qwen2", dict(_LLAMA, vocab_size=QWEN_ROWS, tie_word_embeddings=True, rms_norm_eps=1e-6,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("qwen3", dict(_LLAMA, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mistral": ("mistral", dict(_LLAMA, sliding_window=WINDOW)),
    "mistral-nowindow": ("mistral", dict(_LLAMA, sliding_window=None,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}  # fmt: skip


def hf_config(name: str, **over: Any) -> Any:
    """The transformers config of family `name` (see the module docstring), with overrides."""
    from transformers import AutoConfig

    model_type, kwargs = FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**kwargs, **over})


def hf_model(name: str, seed: int = 0, **over: Any) -> Any:
    """A transformers model of family `name` in eval mode, seeded, with every norm gain and
    bias moved off its initial 1 or 0 (and the other weights perturbed too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name, **over))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_hf_model(
    name: str, out: Path, *, tokenizer: Path | None = None, seed: int = 0, **over: Any
) -> Path:
    """`hf_model(name)` saved with save_pretrained into `out` (created), with the tokenizer of
    sentencepiece model `tokenizer` as tokenizer.json when given; returns `out`. The legacy
    family's config.json is rewritten in the older rope form."""
    from pretrain.tokenizer import hf_tokenizer

    model = hf_model(name, seed, **over)
    model.save_pretrained(out)
    if name == "llama3-legacy":
        write_legacy_rope(out / "config.json")
    if tokenizer is not None:
        hf_tokenizer(tokenizer, model.config.max_position_embeddings).save_pretrained(out)
    return out


def write_legacy_rope(config_json: Path) -> None:
    """Rewrite a config.json's `rope_parameters` as the hub's older files hold RoPE: a
    top-level `rope_theta`, and `rope_scaling` with "type" for a scaled rule."""
    cfg = json.loads(config_json.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    config_json.write_text(json.dumps(cfg, indent=2))


def model_overrides(path: Path) -> list[str]:
    """Hydra overrides `model.<key>=<value>` saying the architecture of the HF model at `path`
    as pretrain reads it: every key `train.init_from` compares, so a run started from `path`
    with them passes its architecture check."""
    from transformers import AutoConfig

    from pretrain.hf import from_hf_config
    from pretrain.pretrained import ARCHITECTURE

    cfg = from_hf_config(AutoConfig.from_pretrained(path))
    out = []
    for key in ARCHITECTURE:
        value = getattr(cfg, key)
        if isinstance(value, list):
            value = "[" + ",".join(map(str, value)) + "]"
        elif isinstance(value, bool):
            value = str(value).lower()
        out.append(f"model.{key}={value}" if value != "" else f"model.{key}=''")
    return out
