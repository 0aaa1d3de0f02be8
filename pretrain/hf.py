"""Hugging Face interop: the one mapping between our GPT and transformers' stock classes.

Both directions live here, for every family, so the writer (`pretrain.export --format hf`) and
the readers (eval, sample, compress, `train.init_from`: `pretrain.pretrained.load_pretrained`)
share one definition. A family is a set of values of our options (`FAMILIES[type].needs`: an
export checks them, an import sets them) plus its config's shape rules (`_conflicts`):

    gpt2     GPT2LMHeadModel      learned positions, LayerNorm, GELU, n_kv_head = n_head
    llama    LlamaForCausalLM     RoPE, RMSNorm, SwiGLU, GQA, biases on all or none (Llama 3.x,
                                  SmolLM2)
    mistral  MistralForCausalLM   Llama without biases, with a sliding_window that never binds
    qwen2    Qwen2ForCausalLM     Llama with biases on q/k/v only (model.qkv_bias)
    qwen3    Qwen3ForCausalLM     Llama with q/k norm (model.qk_norm), any head size

Every RoPE family takes tied or untied output projections and the llama3 RoPE rule. Anything
else is refused in one line naming the attribute that prevents it; nothing needs
`trust_remote_code`. The type written is `model.hf_model_type`, or derived from the options
(`family`); reading records it where the options would derive another (a windowless Mistral).

Parameter names: GPT-2's are ours (its Conv1D block matmuls stored transposed, [in, out]; its
biases always there, zeros for bias=False). The RoPE families share `TOP_NAMES` and
`LAYER_NAMES`, where our fused tensors split along their rows: c_attn [(H + 2*Hkv) * D, C]
into q/k/v_proj [H*D | Hkv*D | Hkv*D] (rotate-half RoPE is HF's layout: no permutation),
c_fc [2*hidden, C] into gate/up_proj. `_links` reads them for both directions.

Vocabulary: our vocab_size is the source's embedding rows (config vocab_size: Qwen's 151,936
for fewer tokenizer ids), so logits and losses span transformers' rows. Our padded rows (-inf
logits) are dropped by an export and added as zeros by an import: the same softmax.

Sliding windows: a sequence no longer than the window gets the full causal mask, so Mistral's
window is computed exactly by capping block_size at it (longer sequences are refused) and
kept in `model.sliding_window` to be written back; a Qwen with windowed layers is refused.

Tokenizer: an export takes the run's tokenizer: a Hugging Face one's files are copied as they
are, a sentencepiece one becomes tokenizer.json (`pretrain.tokenizer.hf_tokenizer`), whose BOS
token is our EOS: every document in our data follows an EOS, so tools that prefix BOS (lm-eval
does for an empty context) condition on what the model was trained to see.

transformers is imported inside the functions: `import pretrain.hf` stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pretrain.engine.precision import DTYPES
from pretrain.model import GPT, HF_MODEL_TYPES, GPTConfig
from pretrain.tokenizer import hf_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """A transformers model type as values of our options: its class (config.json's
    `architectures`) and the GPTConfig fields it fixes, with the value each must have."""

    cls: str
    needs: dict[str, Any]


_ROPE = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
_PLAIN = {"qkv_bias": False, "qk_norm": False, "sliding_window": 0}
FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "GPT2LMHeadModel", {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", **_PLAIN}
    ),
    "llama": Family("LlamaForCausalLM", {**_ROPE, **_PLAIN}),
    # Mistral's window is its own option (model.sliding_window), so it is not fixed here.
    "mistral": Family(
        "MistralForCausalLM", {**_ROPE, "bias": False, "qkv_bias": False, "qk_norm": False}
    ),
    "qwen2": Family("Qwen2ForCausalLM", {**_ROPE, **_PLAIN, "bias": False, "qkv_bias": True}),
    "qwen3": Family("Qwen3ForCausalLM", {**_ROPE, **_PLAIN, "bias": False, "qk_norm": True}),
}
assert tuple(FAMILIES) == HF_MODEL_TYPES  # the model config validates hf_model_type against it
SUPPORTED = ", ".join(f"{t} ({f.cls})" for t, f in FAMILIES.items())
# HF GPT-2 activations that are our tanh-approximated GELU (the same function, two formulas).
GPT2_GELUS = ("gelu_pytorch_tanh", "gelu_new")
# Block matmuls that HF GPT-2 stores transposed (Conv1D: [in, out]).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# RoPE families, per block: our name (a prefix for weight and bias) -> HF's, several when our
# tensor fuses them along its rows (in this order).
LAYER_NAMES: dict[str, tuple[str, ...]] = {
    "ln_1.": ("input_layernorm.",),
    "ln_2.": ("post_attention_layernorm.",),
    "attn.c_attn.": ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."),
    "attn.c_proj.": ("self_attn.o_proj.",),
    "attn.q_norm.": ("self_attn.q_norm.",),
    "attn.k_norm.": ("self_attn.k_norm.",),
    "mlp.c_fc.": ("mlp.gate_proj.", "mlp.up_proj."),
    "mlp.c_proj.": ("mlp.down_proj.",),
}
TOP_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # rows are token ids


def quiet_import() -> None:
    """Import transformers' model code with torchao's start-up notices silenced: transformers
    imports torchao (installed for compression) to look for quantisers, and torchao reports
    each CUDA-only kernel it cannot load on a CPU machine. Call before any transformers use."""
    import logging
    import sys

    if "transformers.modeling_utils" in sys.modules:
        return
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import transformers.modeling_utils  # noqa: F401
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class HFError(ValueError):
    """A model that does not map onto a stock transformers class (or an unreadable HF dir);
    the message says which options prevent it and what to do."""


# ---------------------------------------------------------------------------------------------
# Config, both directions
# ---------------------------------------------------------------------------------------------


def _conflicts(cfg: GPTConfig, fam: str) -> list[str]:
    """What in `cfg` the transformers class of `fam` cannot hold (empty: it fits)."""
    why = [
        f"{k}={getattr(cfg, k)} (needs {v})"
        for k, v in FAMILIES[fam].needs.items()
        if getattr(cfg, k) != v
    ]
    if fam == "gpt2":
        if cfg.kv_heads != cfg.n_head:
            why.append(f"n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention)")
        if cfg.n_head * cfg.head_dim != cfg.n_embd:
            why.append(
                f"n_head * head_size = {cfg.n_head} * {cfg.head_dim} != n_embd={cfg.n_embd} "
                "(GPT-2 derives the head size from n_embd / n_head: heads pruned away do not fit)"
            )
    if fam == "llama" and cfg.n_embd % cfg.n_head:
        why.append(
            f"n_embd={cfg.n_embd} not divisible by n_head={cfg.n_head} (LlamaConfig requires "
            "it even with an explicit head_dim: prune to a head count that divides n_embd)"
        )
    if not cfg.uniform:
        why.append(
            "layers of different shapes (layer_heads / layer_mlp_hidden: one size for every "
            "layer is all a stock config holds)"
        )
    return why


def family(cfg: GPTConfig) -> str:
    """The transformers model type `cfg` is written as: `cfg.hf_model_type`, or derived from
    the options (gpt2 for learned positions; for RoPE, qwen3 with q/k norm, qwen2 with q/k/v
    biases, mistral with a sliding window, else llama). HFError naming what prevents it."""
    if cfg.hf_model_type:
        candidates = [cfg.hf_model_type]
    else:
        rope = (
            "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias
            else "mistral" if cfg.sliding_window else "llama"
        )  # fmt: skip
        candidates = ["gpt2", rope]
    why = {fam: _conflicts(cfg, fam) for fam in candidates}
    if fits := [fam for fam in candidates if not why[fam]]:
        return fits[0]
    raise HFError(
        "this model fits no stock transformers class: "
        + "; ".join(f"{FAMILIES[f].cls} is prevented by {', '.join(why[f])}" for f in candidates)
        + ". Set the options a family needs (model.hf_model_type names one of "
        f"{', '.join(FAMILIES)}; empty derives it), or export our own format (an out path "
        "ending in .safetensors)."
    )


def rope_parameters(cfg: GPTConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` of `cfg` (as save_pretrained writes it)."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling == "llama3":
        params.update(
            rope_type="llama3",
            factor=float(cfg.rope_factor),
            low_freq_factor=float(cfg.rope_low_freq_factor),
            high_freq_factor=float(cfg.rope_high_freq_factor),
            original_max_position_embeddings=int(cfg.rope_original_max_len),
        )
    return params


def to_hf_config(
    cfg: GPTConfig,
    *,
    eos_id: int,
    pad_id: int | None,
    bos_id: int | None = None,
    dtype: str = "fp32",
) -> PretrainedConfig:
    """The transformers config of the stock class `cfg` maps onto (HFError if none).

    bos_id None: eos_id (documents start after EOS in our data); -1 (or a pad_id of -1): none."""
    quiet_import()
    from transformers import AutoConfig

    fam = family(cfg)
    bos = eos_id if bos_id is None else bos_id
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos if bos >= 0 else None,
        eos_token_id=eos_id,
        pad_token_id=pad_id if pad_id is not None and pad_id >= 0 else None,
        initializer_range=cfg.init_std,
        dtype=str(DTYPES[dtype]).removeprefix("torch."),
        architectures=[FAMILIES[fam].cls],
    )
    if fam == "gpt2":
        return AutoConfig.for_model(
            fam,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.mlp_hidden or None,  # None: 4 * n_embd, as ours
            # Bit-identical to F.gelu(approximate="tanh"); the default gelu_new is the same
            # function written out in Python (1e-7 apart).
            activation_function="gelu_pytorch_tanh",
            layer_norm_epsilon=cfg.norm_eps,
            **{f"{k}_pdrop": cfg.dropout for k in ("resid", "embd", "attn")},
            **common,
        )
    own: dict[str, dict[str, Any]] = {
        "llama": dict(attention_bias=cfg.bias, mlp_bias=cfg.bias),
        "mistral": dict(sliding_window=cfg.sliding_window or None),
        "qwen2": dict(use_sliding_window=False),
        "qwen3": dict(attention_bias=False, use_sliding_window=False),
    }
    return AutoConfig.for_model(
        fam,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        **({"head_dim": cfg.head_dim} if fam != "qwen2" or cfg.head_size else {}),  # no field
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,  # HF's default is 1e-6, ours 1e-5: always set it
        rope_parameters=rope_parameters(cfg),
        hidden_act="silu",
        attention_dropout=cfg.dropout,
        **own[fam],
        **common,
    )


def _read_gpt2(hc: PretrainedConfig, refuse: list[str]) -> dict[str, Any]:
    """GPTConfig fields of a GPT-2 config besides its family's; what we cannot compute goes to
    `refuse`, one 'attribute=value (why)' each."""
    if hc.activation_function not in GPT2_GELUS:
        refuse.append(f"activation_function={hc.activation_function!r} (ours is tanh GELU)")
    if not hc.scale_attn_weights or hc.scale_attn_by_inverse_layer_idx:
        refuse.append("attention scaling other than 1/sqrt(head_dim)")
    if getattr(hc, "add_cross_attention", False):
        refuse.append("add_cross_attention=True")
    return dict(
        vocab_size=hc.vocab_size,
        block_size=hc.n_positions,
        n_layer=hc.n_layer,
        n_head=hc.n_head,
        n_embd=hc.n_embd,
        mlp_hidden=hc.n_inner or 0,  # None: 4 * n_embd, our default rule too
        bias=True,  # HF GPT-2 always has them; `load_hf` reads all-zero biases as bias=False
        tie_embeddings=bool(getattr(hc, "tie_word_embeddings", True)),
        norm_eps=hc.layer_norm_epsilon,
    )


def _read_rope(hc: PretrainedConfig, fam: str, refuse: list[str]) -> dict[str, Any]:
    """GPTConfig fields of a RoPE family's config besides its family's (as `_read_gpt2`)."""
    rope = dict(getattr(hc, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "llama3"):
        refuse.append(f"rope_type={kind!r} (ours: default, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (ours rotates all)")
    if hc.hidden_act != "silu":
        refuse.append(f"hidden_act={hc.hidden_act!r} (SwiGLU needs silu)")
    heads, width = hc.num_attention_heads, hc.hidden_size
    head_dim = getattr(hc, "head_dim", None) or width // heads
    positions = hc.max_position_embeddings
    out: dict[str, Any] = dict(
        vocab_size=hc.vocab_size,
        block_size=positions,
        n_layer=hc.num_hidden_layers,
        n_head=heads,
        n_kv_head=0 if (hc.num_key_value_heads or heads) == heads else hc.num_key_value_heads,
        n_embd=width,
        # Set only where it is not the derived n_embd / n_head (Qwen3, heads pruned away).
        head_size=0 if head_dim * heads == width else head_dim,
        mlp_hidden=hc.intermediate_size,
        rope_theta=float(rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))),
        tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)),
        norm_eps=hc.rms_norm_eps,
    )
    if kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_len=int(rope["original_max_position_embeddings"]),
        )
    if fam == "llama":
        if bool(hc.attention_bias) != bool(hc.mlp_bias):  # our model.bias covers both
            refuse.append(f"attention_bias={hc.attention_bias} with mlp_bias={hc.mlp_bias}")
        if getattr(hc, "pretraining_tp", 1) not in (None, 1):
            refuse.append(f"pretraining_tp={hc.pretraining_tp}")
        out["bias"] = bool(hc.attention_bias)
    if fam == "qwen3" and hc.attention_bias:  # ours: all matmuls (bias) or q/k/v (qkv_bias)
        refuse.append("attention_bias=True (q/k/v/o biases without MLP ones)")
    window = getattr(hc, "sliding_window", None) or 0
    if fam == "mistral" and window:
        # Every layer is windowed. A sequence of at most `window` tokens gets the full causal
        # mask, so capping the positions at the window computes it exactly.
        out.update(block_size=min(positions, window), sliding_window=window)
    layers = [i for i, t in enumerate(getattr(hc, "layer_types", None) or []) if "slid" in t]
    if fam in ("qwen2", "qwen3") and layers and window < positions:
        refuse.append(
            f"use_sliding_window=True (sliding_window={window} < max_position_embeddings="
            f"{positions} on layers {layers}: a window on some layers is not computed)"
        )
    return out


def from_hf_config(hc: PretrainedConfig) -> GPTConfig:
    """Our GPTConfig for a transformers config of one of `FAMILIES`; HFError naming the
    attribute that prevents it otherwise.

    Dropout is left at 0 (it is a training choice, not architecture) and the vocabulary is
    padded with our default rule."""
    mt = getattr(hc, "model_type", None)
    arch = ", ".join(getattr(hc, "architectures", None) or []) or "?"
    if mt not in FAMILIES:
        raise HFError(
            f"Hugging Face model_type {mt!r} ({arch}) is not supported: pretrain reads {SUPPORTED}"
        )
    refuse: list[str] = []
    fields = _read_gpt2(hc, refuse) if mt == "gpt2" else _read_rope(hc, mt, refuse)
    if refuse:
        raise HFError(
            f"this {FAMILIES[mt].cls} ({mt}) does not map onto our model: {'; '.join(refuse)}. "
            f"pretrain reads {SUPPORTED} where its GPT computes them exactly"
        )
    try:
        cfg = GPTConfig(**{**FAMILIES[mt].needs, **fields}).validate()
        if family(cfg) != mt:  # the options alone would derive another type: record it
            cfg = replace(cfg, hf_model_type=mt)
    except ValueError as e:
        raise HFError(f"this {FAMILIES[mt].cls} does not map onto our model: {e}") from e
    return cfg


# ---------------------------------------------------------------------------------------------
# Weights, both directions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One of our tensors and the HF tensors it is: `rows` of it each, in order (q|k|v,
    gate|up), transposed where HF stores [in, out] (GPT-2's Conv1D)."""

    ours: str
    theirs: tuple[str, ...]
    rows: tuple[int, ...]
    transpose: bool = False


def _links(cfg: GPTConfig, fam: str) -> list[Link]:
    """Every tensor of GPT(cfg) (a tied output projection once) and its HF names in `fam`:
    the one mapping both directions use. Shapes are read off the model on the meta device."""
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in GPT(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        del shapes["lm_head.weight"]  # HF ties it to the embedding itself
    links = []
    for ours, shape in shapes.items():
        rows: tuple[int, ...] = (cfg.vocab_size if ours in VOCAB_ROWS else shape[0],)
        if fam == "gpt2":
            links.append(Link(ours, (ours,), rows, ours.endswith(CONV1D)))
            continue
        if ours in TOP_NAMES:
            links.append(Link(ours, (TOP_NAMES[ours],), rows))
            continue
        i, name = ours.removeprefix("transformer.h.").split(".", 1)
        prefix = next(p for p in LAYER_NAMES if name.startswith(p))
        theirs = tuple(f"model.layers.{i}.{t}{name[len(prefix) :]}" for t in LAYER_NAMES[prefix])
        if prefix == "attn.c_attn.":
            H, Hkv, D = cfg.heads_of(int(i)), cfg.kv_heads_of(int(i)), cfg.head_dim
            rows = (H * D, Hkv * D, Hkv * D)
        elif len(theirs) == 2:  # gate | up
            rows = (shape[0] // 2, shape[0] // 2)
        links.append(Link(ours, theirs, rows))
    return links


def to_hf_state_dict(
    cfg: GPTConfig,
    sd: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    *,
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """Our state dict (padded vocabulary) -> the HF state dict of `family(cfg)`, in `dtype`.

    Every tensor is a fresh contiguous copy (safetensors refuses views that share storage).
    consume=True empties `sd` as it goes, so a large model is held about once, not twice."""
    fam = family(cfg)
    out: dict[str, torch.Tensor] = {}
    for link in _links(cfg, fam):
        t = sd.pop(link.ours) if consume else sd[link.ours]
        if link.ours in VOCAB_ROWS:
            t = t[: cfg.vocab_size]  # drop the padded rows
        for name, part in zip(link.theirs, t.split(link.rows)):
            out[name] = (part.t() if link.transpose else part).detach().to(dtype=dtype, copy=True)
            out[name] = out[name].contiguous()
        del t
    if fam == "gpt2" and not cfg.bias:  # HF GPT-2 always has biases: zeros are ours
        for k, v in list(out.items()):
            if k.startswith("transformer.h.") or k.startswith("transformer.ln_f"):
                cols = v.shape[-1] if k.endswith(CONV1D) else v.shape[0]
                out.setdefault(k.removesuffix("weight") + "bias", torch.zeros(cols, dtype=dtype))
    if consume:
        sd.clear()  # a tied lm_head alias is all that can be left
    return out


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` ([vocab, C]) with zero rows appended up to `rows` (or cut to it): padded ids are
    masked to -inf in our forward, so their rows never change an output. Callers cut only
    padded rows: `rows` is never below the model's vocab_size."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def from_hf_state_dict(cfg: GPTConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF state dict of `family(cfg)` -> our state dict (vocabulary padded for `cfg`, fp32).

    With tied embeddings both our names hold the same tensor, as in `GPT.state_dict()`. A
    tensor the mapping does not take (an extra bias, a norm we do not have) is refused: it
    would change the outputs."""
    fam = family(cfg)
    left = {k for k in hf if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    out: dict[str, torch.Tensor] = {}
    for link in _links(cfg, fam):
        try:
            parts = [hf[name].detach().float() for name in link.theirs]
        except KeyError as e:
            raise HFError(f"the Hugging Face weights lack {e.args[0]} (for our {link.ours})") from e
        left -= set(link.theirs)
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        t = t.t().contiguous() if link.transpose else t
        out[link.ours] = pad_vocab(t, cfg.padded_vocab_size) if link.ours in VOCAB_ROWS else t
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
        left.discard("lm_head.weight")
    if fam == "gpt2" and not cfg.bias:  # all zeros (`load_hf` checked): a bias=False model
        left = {k for k in left if not k.endswith(".bias")}
    if left:
        raise HFError(
            f"the Hugging Face weights hold {sorted(left)[:6]} that our {fam} mapping does not "
            "take: this is not the model its config describes"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------


class ExportTokenizer(Protocol):
    """What an export needs of the run's tokenizer (sentencepiece or Hugging Face)."""

    @property
    def kind(self) -> str: ...  # "sentencepiece" | "hf"
    @property
    def files(self) -> Sequence[str | Path]: ...  # its files on disk
    @property
    def eos_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...  # -1: none


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


# A run started from a Hugging Face directory keeps, in <run dir>/hf_source/, the source's files
# that say more than its weights and tokenizer: its special token ids (config.json, and
# generation_config.json with its generation defaults and, for instruct models, several EOS ids)
# and its chat template. An export of the run writes them back (`save_hf(source=...)`).
SOURCE_DIR = "hf_source"
SOURCE_FILES = (
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def keep_source_files(source: Path, dest: Path) -> None:
    """Copy `SOURCE_FILES` of HF directory `source` (or of a run's `hf_source/`) into `dest`."""
    found = [source / f for f in SOURCE_FILES if (source / f).is_file()]
    if found:
        dest.mkdir(parents=True, exist_ok=True)
        for f in found:
            shutil.copy2(f, dest / f.name)


def save_hf(
    cfg: GPTConfig,
    sd: dict[str, torch.Tensor],
    out: str | Path,
    tokenizer: ExportTokenizer | str | Path,
    *,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    consume: bool = False,
    source: Path | None = None,
) -> Path:
    """Write `out/` so that stock transformers loads it offline: config.json,
    generation_config.json, model*.safetensors (sharded with an index above max_shard_size,
    as save_pretrained shards) and the tokenizer, whose special ids the config takes: a
    Hugging Face one's own files, or tokenizer.json made from a sentencepiece one (an object,
    or the path of its .model file). consume=True empties `sd` (see `to_hf_state_dict`).
    `source`: the `SOURCE_FILES` of the HF model the run started from; where the export is of
    its type, its special token ids, generation config and chat template are written back."""
    quiet_import()
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if isinstance(tokenizer, (str, Path)):
        kind, files = "sentencepiece", [Path(tokenizer)]
    else:
        kind, files = tokenizer.kind, [Path(f) for f in tokenizer.files]
    if not files:
        raise HFError("the tokenizer has no files on disk: load it from its files to export")
    sp_model = next((f for f in files if f.suffix == ".model"), None)
    if kind == "sentencepiece" and sp_model is not None:
        sp = spm.SentencePieceProcessor(model_file=str(sp_model))
        n_ids, eos, bos, pad = sp.get_piece_size(), sp.eos_id(), sp.eos_id(), sp.pad_id()
    elif kind == "hf" and not isinstance(tokenizer, (str, Path)):
        n_ids, eos, bos = (
            int(getattr(tokenizer, "vocab_size", 0)),
            tokenizer.eos_id,
            tokenizer.bos_id,
        )
        pad = int(getattr(tokenizer, "pad_id", -1))
    else:
        raise HFError(f"a {kind!r} tokenizer ({files}): an export takes sentencepiece or hf ones")
    if n_ids > cfg.vocab_size:  # (BOS = EOS for sentencepiece: see the module docstring)
        raise HFError(
            f"the tokenizer {files[0]} has {n_ids} ids but the model only {cfg.vocab_size} "
            "rows: this is not the model's tokenizer"
        )
    hc = to_hf_config(cfg, eos_id=eos, bos_id=bos, pad_id=pad, dtype=dtype)
    src_cfg = {}
    if source is not None and (source / "config.json").is_file():
        src_cfg = json.loads((source / "config.json").read_text())
    same_type = src_cfg.get("model_type") == hc.model_type
    for key in SPECIAL_IDS if same_type else ():
        if key in src_cfg:  # the source's ids, e.g. Qwen's BOS that its tokenizer never adds
            setattr(hc, key, src_cfg[key])
    weights = to_hf_state_dict(cfg, sd, DTYPES[dtype], consume=consume)
    # Built on the meta device (no init of weights that are overwritten at once), then the
    # converted tensors are assigned as its parameters.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hc, dtype=DTYPES[dtype])
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    tied = ["lm_head.weight"] if cfg.tie_embeddings else []
    if sorted(set(missing) - set(tied)) or unexpected:
        raise RuntimeError(f"HF mapping is incomplete: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=hc.bos_token_id, eos_token_id=hc.eos_token_id, pad_token_id=hc.pad_token_id
    )
    if same_type and source is not None and (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for name in ("chat_template.jinja", "chat_template.json") if same_type else ():
        if source is not None and (source / name).is_file():
            shutil.copy2(source / name, out / name)
    if sp_model is None or kind == "hf":
        for f in files:  # as they are; a config it took its EOS from is the model's to write
            if f.name not in ("config.json", "generation_config.json"):
                shutil.copy2(f, out / f.name)
        return out
    hf_tokenizer(sp_model, cfg.block_size).save_pretrained(out)
    # transformers 5 names its fast tokenizer class TokenizersBackend; PreTrainedTokenizerFast is
    # the same class there and the name transformers 4 knows, so readers of either load it.
    tok_cfg = out / "tokenizer_config.json"
    fields = {**json.loads(tok_cfg.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}
    tok_cfg.write_text(json.dumps(fields, indent=2))
    return out


def load_hf(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Our config and fp32 state dict from an HF directory of one of `FAMILIES`.

    The architecture is checked from config.json before any weight is read."""
    path = Path(path)
    cfg = read_config(path)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per small load is noise in eval's output
    try:
        with _zero3_off():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, output_loading_info=True
            )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model, info = loaded
    if info["missing_keys"] or info["mismatched_keys"]:
        raise HFError(
            f"{path} lacks weights {sorted(info['missing_keys'])} or has mis-shaped ones "
            f"{sorted(info['mismatched_keys'])}: transformers would fill them with random "
            "values; re-export the model"
        )
    hf_sd = model.state_dict()
    del model
    return cfg, from_hf_state_dict(cfg, hf_sd)


@contextlib.contextmanager
def _zero3_off() -> Iterator[None]:
    """transformers partitions every model it loads while a ZeRO-3 DeepSpeed config is alive in
    the process (a process-wide reference Accelerate's plugin sets): here the weights are read
    whole, and each rank keeps its own part of them (`Engine.load_model_weights`)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def read_config(path: str | Path) -> GPTConfig:
    """Our GPTConfig of the HF directory `path` (one of `FAMILIES`), from its config.json and,
    for GPT-2, its bias tensors alone: HF GPT-2 always has biases, and ours exports a
    bias=False model with zero biases, which is exactly a bias=False model: read back as one."""
    quiet_import()
    from transformers import AutoConfig

    path = Path(path)
    try:
        hc = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        model_type = _peek_model_type(path)
        if model_type is not None:  # a config transformers does not know at all
            raise HFError(
                f"Hugging Face model_type {model_type!r} in {path} is not supported: pretrain "
                f"reads {SUPPORTED}"
            ) from e
        raise HFError(f"{path}/config.json is not a readable Hugging Face config: {e}") from e
    cfg = from_hf_config(hc)
    if cfg.pos_emb == "learned" and not any(t.any() for t in _bias_tensors(path)):
        cfg = replace(cfg, bias=False)
    return cfg


def _bias_tensors(path: Path) -> list[torch.Tensor]:
    """The `transformer.*bias` tensors of a safetensors HF directory, read one at a time
    (none for a directory of another format: its biases are taken as real)."""
    from safetensors import safe_open

    files = sorted(path.glob("model*.safetensors"))
    out = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out += [
                st.get_tensor(k)
                for k in st.keys()  # noqa: SIM118 - a safetensors handle, not a dict
                if k.startswith("transformer.") and k.endswith("bias")
            ]
    return out or [torch.ones(1)]


def _peek_model_type(path: Path) -> str | None:
    try:
        value = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value is not None else None
