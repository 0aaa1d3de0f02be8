"""Hugging Face interop: the one mapping between our GPT and transformers' stock classes.

Both directions live here, for both families, so the writer (`pretrain.export --format hf`) and
the readers (`pretrain.eval`, `train.init_from`) share one definition:

    GPT-2 mode (pos_emb=learned, norm=layernorm, mlp=gelu, n_kv_head = n_head)  <-> GPT2LMHeadModel
    Llama mode (pos_emb=rope, norm=rmsnorm, mlp=swiglu, any n_kv_head)           <-> LlamaForCausalLM

Tied or untied output projections, with or without biases, map in both families. A config that
mixes the two (rope + LayerNorm, swiglu with learned positions, ...) fits no stock class and is
refused, naming the options that prevent each one; nothing needs `trust_remote_code`.

Parameter names, ours -> HF (`i` = block index; shapes as in pretrain/model/gpt.py):

    GPT-2: identical names. HF's GPT-2 uses Conv1D, which stores weights as [in, out]: the
           four block matmuls (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are transposed,
           everything else is copied. HF always has biases: with bias=False they are zeros.
    Llama: transformer.wte -> model.embed_tokens, transformer.ln_f -> model.norm,
           h.i.ln_1 / ln_2 -> layers.i.input_layernorm / post_attention_layernorm,
           h.i.attn.c_attn [(H + 2*Hkv) * D, C] -> split rows [H*D | Hkv*D | Hkv*D] into
               self_attn.q_proj / k_proj / v_proj (our RoPE is rotate-half, HF's layout: no
               permutation of q/k rows is needed),
           h.i.attn.c_proj -> self_attn.o_proj,
           h.i.mlp.c_fc [2*hidden, C] -> split rows [gate | up] into mlp.gate_proj / up_proj,
           h.i.mlp.c_proj -> mlp.down_proj.

Vocabulary: our embedding and output matrices have padded rows whose logits are masked to -inf;
HF has no mask, so the export drops them (HF's vocab_size is the real one) and the import adds
zero rows. Either way both softmaxes are the same vocab_size-way softmax.

Tokenizer: `hf_tokenizer` writes tokenizer.json from the sentencepiece model (BPE with byte
fallback, no normaliser, no dummy prefix, specials split like text, no BOS added): the same ids
as sentencepiece on any text. Its BOS token is our EOS: every document in our data follows an
EOS, so EOS is the token a document starts after, and tools that prefix BOS (lm-eval does for an
empty context) condition on what the model was trained to see.

transformers is imported inside the functions: `import pretrain.hf` stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from pretrain.engine.precision import DTYPES
from pretrain.model import GPTConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

Family = Literal["gpt2", "llama"]
# What each stock class needs, as (GPTConfig field, required value); n_kv_head is checked apart.
NEEDS: dict[Family, dict[str, str]] = {
    "gpt2": {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"},
    "llama": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
}
CLASSES: dict[Family, str] = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# HF GPT-2 activations that are our tanh-approximated GELU (the same function, two formulas).
GPT2_GELUS = ("gelu_pytorch_tanh", "gelu_new")
# Block matmuls that HF GPT-2 stores transposed (Conv1D: [in, out]).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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


def family(cfg: GPTConfig) -> Family:
    """The stock transformers family of `cfg`, or HFError naming what prevents each one."""
    why: dict[Family, list[str]] = {}
    for fam, needs in NEEDS.items():
        why[fam] = [
            f"{k}={getattr(cfg, k)} (needs {v})" for k, v in needs.items() if getattr(cfg, k) != v
        ]
    if cfg.kv_heads != cfg.n_head:
        why["gpt2"].append(f"n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention)")
    if cfg.n_head * cfg.head_dim != cfg.n_embd:
        why["gpt2"].append(
            f"n_head * head_size = {cfg.n_head} * {cfg.head_dim} != n_embd={cfg.n_embd} (GPT-2 "
            "derives the head size from n_embd / n_head: heads pruned away do not fit)"
        )
    if cfg.n_embd % cfg.n_head:
        why["llama"].append(
            f"n_embd={cfg.n_embd} not divisible by n_head={cfg.n_head} (LlamaConfig requires "
            "it even with an explicit head_dim: prune to a head count that divides n_embd)"
        )
    if not cfg.uniform:
        for fam in NEEDS:
            why[fam].append(
                "layers of different shapes (layer_heads / layer_mlp_hidden: one size for every "
                "layer is all a stock config holds)"
            )
    for fam in NEEDS:
        if not why[fam]:
            return fam
    raise HFError(
        "this model fits no stock transformers class: "
        + "; ".join(f"{CLASSES[f]} is prevented by {', '.join(why[f])}" for f in NEEDS)
        + ". Train with all the GPT-2 options or all the Llama options to export to Hugging "
        "Face, or export our own format (an out path ending in .safetensors)."
    )


def to_hf_config(
    cfg: GPTConfig, *, eos_id: int, pad_id: int, dtype: str = "fp32"
) -> PretrainedConfig:
    """The transformers config of the stock class `cfg` maps onto (HFError if none)."""
    quiet_import()
    from transformers import GPT2Config, LlamaConfig

    fam = family(cfg)
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos_id,  # see the module docstring: documents start after EOS
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=cfg.init_std,
        dtype=str(DTYPES[dtype]).removeprefix("torch."),
        architectures=[CLASSES[fam]],
    )
    if fam == "gpt2":
        return GPT2Config(
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.mlp_hidden_size,
            # Bit-identical to F.gelu(approximate="tanh"); the default gelu_new is the same
            # function written out in Python (1e-7 apart).
            activation_function="gelu_pytorch_tanh",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **common,
        )
    return LlamaConfig(
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,  # HF's default is 1e-6, ours 1e-5: always set it
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        hidden_act="silu",
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        attention_dropout=cfg.dropout,
        **common,
    )


def from_hf_config(hc: PretrainedConfig) -> GPTConfig:
    """Our GPTConfig for a GPT-2 or Llama transformers config; HFError naming what else it is.

    Dropout is left at 0 (it is a training choice, not architecture) and the vocabulary is
    padded with our default rule."""
    mt = getattr(hc, "model_type", None)
    arch = ", ".join(getattr(hc, "architectures", None) or []) or "?"
    refuse = []
    if mt == "gpt2":
        if hc.activation_function not in GPT2_GELUS:
            refuse.append(f"activation_function={hc.activation_function!r} (ours is tanh GELU)")
        if not hc.scale_attn_weights or hc.scale_attn_by_inverse_layer_idx:
            refuse.append("attention scaling other than 1/sqrt(head_dim)")
        if getattr(hc, "add_cross_attention", False):
            refuse.append("cross-attention")
        cfg = GPTConfig(
            vocab_size=hc.vocab_size,
            block_size=hc.n_positions,
            n_layer=hc.n_layer,
            n_head=hc.n_head,
            n_embd=hc.n_embd,
            mlp_hidden=hc.n_inner or 0,  # None: 4 * n_embd, our default rule too
            bias=True,
            tie_embeddings=bool(getattr(hc, "tie_word_embeddings", True)),
            norm_eps=hc.layer_norm_epsilon,
        )
    elif mt == "llama":
        rope = dict(getattr(hc, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            refuse.append(f"rope_type={rope.get('rope_type')!r} (ours is plain RoPE)")
        if hc.hidden_act != "silu":
            refuse.append(f"hidden_act={hc.hidden_act!r} (SwiGLU needs silu)")
        head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
        if bool(hc.attention_bias) != bool(hc.mlp_bias):
            refuse.append("attention_bias != mlp_bias (our model.bias covers both)")
        if getattr(hc, "pretraining_tp", 1) not in (None, 1):
            refuse.append(f"pretraining_tp={hc.pretraining_tp}")
        cfg = GPTConfig(
            vocab_size=hc.vocab_size,
            block_size=hc.max_position_embeddings,
            n_layer=hc.num_hidden_layers,
            n_head=hc.num_attention_heads,
            n_kv_head=hc.num_key_value_heads or hc.num_attention_heads,
            n_embd=hc.hidden_size,
            # Set only where it is not the derived n_embd / n_head (e.g. heads pruned away).
            head_size=0 if head_dim * hc.num_attention_heads == hc.hidden_size else head_dim,
            mlp_hidden=hc.intermediate_size,
            bias=bool(hc.attention_bias),
            norm="rmsnorm",
            mlp="swiglu",
            pos_emb="rope",
            rope_theta=float(rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))),
            tie_embeddings=bool(getattr(hc, "tie_word_embeddings", False)),
            norm_eps=hc.rms_norm_eps,
        )
        if cfg.n_kv_head == cfg.n_head:
            cfg = replace(cfg, n_kv_head=0)
    else:
        raise HFError(
            f"Hugging Face model_type {mt!r} ({arch}) is not supported: pretrain reads "
            "GPT2LMHeadModel and LlamaForCausalLM checkpoints"
        )
    if refuse:
        raise HFError(
            f"this {CLASSES[mt]} does not match our model: {'; '.join(refuse)}. pretrain reads "
            "only checkpoints its GPT computes exactly"
        )
    return cfg.validate()


# ---------------------------------------------------------------------------------------------
# Weights, both directions
# ---------------------------------------------------------------------------------------------


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
    V = cfg.vocab_size

    def take(key: str) -> torch.Tensor:
        return sd.pop(key) if consume else sd[key]

    def new(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype=dtype, copy=True).contiguous()

    out: dict[str, torch.Tensor] = {}
    if fam == "gpt2":
        for k in list(sd):
            v = take(k)
            if k == "lm_head.weight" and cfg.tie_embeddings:
                continue  # HF ties it to transformer.wte itself
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:V]  # drop the padded rows
            out[k] = new(v.t() if k.endswith(CONV1D) else v)
            del v
        if not cfg.bias:  # HF GPT-2 always has biases (LayerNorm and Conv1D): zeros are ours
            for k, v in list(out.items()):
                if (
                    k.endswith(".weight")
                    and "wte" not in k
                    and "wpe" not in k
                    and "lm_head" not in k
                ):
                    cols = v.shape[-1] if k.endswith(CONV1D) else v.shape[0]
                    out.setdefault(k[: -len("weight")] + "bias", torch.zeros(cols, dtype=dtype))
        return out

    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    out["model.embed_tokens.weight"] = new(take("transformer.wte.weight")[:V])
    out["model.norm.weight"] = new(take("transformer.ln_f.weight"))
    head = take("lm_head.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = new(head[:V])
    del head
    for i in range(cfg.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = new(take(ours + "ln_1.weight"))
        out[hf + "post_attention_layernorm.weight"] = new(take(ours + "ln_2.weight"))
        for s in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = take(ours + f"attn.c_attn.{s}").split([H * D, Hkv * D, Hkv * D])
            gate, up = take(ours + f"mlp.c_fc.{s}").chunk(2)
            out[hf + f"self_attn.q_proj.{s}"] = new(q)
            out[hf + f"self_attn.k_proj.{s}"] = new(k)
            out[hf + f"self_attn.v_proj.{s}"] = new(v)
            out[hf + f"self_attn.o_proj.{s}"] = new(take(ours + f"attn.c_proj.{s}"))
            out[hf + f"mlp.gate_proj.{s}"] = new(gate)
            out[hf + f"mlp.up_proj.{s}"] = new(up)
            out[hf + f"mlp.down_proj.{s}"] = new(take(ours + f"mlp.c_proj.{s}"))
            del q, k, v, gate, up
    return out


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` ([vocab, C]) with zero rows appended up to `rows` (or cut to it): padded ids are
    masked to -inf in our forward, so their rows never change an output."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def from_hf_state_dict(cfg: GPTConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF state dict of `family(cfg)` -> our state dict (vocabulary padded for `cfg`, fp32).

    With tied embeddings both our names hold the same tensor, as in `GPT.state_dict()`."""
    fam = family(cfg)
    rows = cfg.padded_vocab_size
    f32: dict[str, torch.Tensor] = {k: v.detach().float() for k, v in hf.items()}
    out: dict[str, torch.Tensor] = {}
    if fam == "gpt2":
        for k, v in f32.items():
            if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
                continue  # causal-mask buffers of older transformers versions
            if k.endswith(".bias") and not cfg.bias:
                continue
            out[k] = v.t().contiguous() if k.endswith(CONV1D) else v
        out["transformer.wte.weight"] = pad_vocab(out["transformer.wte.weight"], rows)
        if cfg.tie_embeddings or "lm_head.weight" not in out:
            out["lm_head.weight"] = out["transformer.wte.weight"]
        else:
            out["lm_head.weight"] = pad_vocab(out["lm_head.weight"], rows)
        return out

    out["transformer.wte.weight"] = pad_vocab(f32["model.embed_tokens.weight"], rows)
    out["transformer.ln_f.weight"] = f32["model.norm.weight"]
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    else:
        out["lm_head.weight"] = pad_vocab(f32["lm_head.weight"], rows)
    for i in range(cfg.n_layer):
        ours, hf_ = f"transformer.h.{i}.", f"model.layers.{i}."
        out[ours + "ln_1.weight"] = f32[hf_ + "input_layernorm.weight"]
        out[ours + "ln_2.weight"] = f32[hf_ + "post_attention_layernorm.weight"]
        for s in ("weight", "bias") if cfg.bias else ("weight",):
            a = hf_ + "self_attn."
            out[ours + f"attn.c_attn.{s}"] = torch.cat(
                [f32[a + f"q_proj.{s}"], f32[a + f"k_proj.{s}"], f32[a + f"v_proj.{s}"]]
            )
            out[ours + f"attn.c_proj.{s}"] = f32[a + f"o_proj.{s}"]
            m = hf_ + "mlp."
            out[ours + f"mlp.c_fc.{s}"] = torch.cat(
                [f32[m + f"gate_proj.{s}"], f32[m + f"up_proj.{s}"]]
            )
            out[ours + f"mlp.c_proj.{s}"] = f32[m + f"down_proj.{s}"]
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def hf_tokenizer(sp_model: str | Path, model_max_length: int) -> PreTrainedTokenizerFast:
    """A fast HF tokenizer that gives sentencepiece model `sp_model`'s ids on any text.

    Valid for models trained as pretrain.tokenizer trains them (BPE, byte fallback, identity
    normalisation, no dummy prefix, whitespace kept): the pieces become a tokenizers BPE whose
    merges are regenerated from the vocabulary, with a Metaspace pre-tokenizer that neither
    prepends nor splits. No post-processor: nothing is added to encoded text (our data has no
    BOS), and `split_special_tokens=True` makes text that spells "</s>" encode as text, as
    sentencepiece does."""
    quiet_import()
    import sentencepiece as spm
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    # Byte pieces (<0x41>) are reached through byte fallback only, never by merging text.
    no_merge = specials + [sp.id_to_piece(i) for i in range(n) if sp.is_byte(i)]
    raw = RawTokenizer(
        BPE(
            vocab=vocab,
            merges=generate_merges(vocab, skip_tokens=no_merge),
            unk_token=sp.id_to_piece(sp.unk_id()),
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    raw.normalizer = None
    raw.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=False
    )
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    piece = sp.id_to_piece
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token=piece(sp.unk_id()),
        bos_token=piece(sp.eos_id()),  # see the module docstring
        eos_token=piece(sp.eos_id()),
        pad_token=piece(sp.pad_id()) if sp.pad_id() >= 0 else None,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def save_hf(
    cfg: GPTConfig,
    sd: dict[str, torch.Tensor],
    out: str | Path,
    sp_model: str | Path,
    *,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    consume: bool = False,
) -> Path:
    """Write `out/` so that stock transformers loads it offline: config.json,
    generation_config.json, model*.safetensors (sharded with an index above max_shard_size,
    as save_pretrained shards), tokenizer.json and tokenizer_config.json.

    consume=True empties `sd` while converting (see `to_hf_state_dict`)."""
    import sentencepiece as spm

    quiet_import()
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    if sp.get_piece_size() > cfg.vocab_size:
        raise HFError(
            f"the tokenizer {sp_model} has {sp.get_piece_size()} pieces but the model only "
            f"{cfg.vocab_size}: this is not the model's tokenizer"
        )
    hc = to_hf_config(cfg, eos_id=sp.eos_id(), pad_id=sp.pad_id(), dtype=dtype)
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    hf_tokenizer(sp_model, cfg.block_size).save_pretrained(out)
    # transformers 5 names its fast tokenizer class TokenizersBackend; PreTrainedTokenizerFast is
    # the same class there and the name transformers 4 knows, so readers of either load it.
    tok_cfg = out / "tokenizer_config.json"
    tok_cfg.write_text(
        json.dumps(
            {**json.loads(tok_cfg.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"},
            indent=2,
        )
    )
    return out


def load_hf(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Our config and fp32 state dict from an HF directory of a GPT-2 or Llama model.

    The architecture is checked from config.json before any weight is read."""
    quiet_import()
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    try:
        hc = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        model_type = _peek_model_type(path)
        if model_type is not None:  # a config transformers does not know at all
            raise HFError(
                f"Hugging Face model_type {model_type!r} in {path} is not supported: pretrain "
                "reads GPT2LMHeadModel and LlamaForCausalLM checkpoints"
            ) from e
        raise HFError(f"{path}/config.json is not a readable Hugging Face config: {e}") from e
    cfg = from_hf_config(hc)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per small load is noise in eval's output
    try:
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
    if cfg.pos_emb == "learned" and all(
        not v.any()
        for k, v in hf_sd.items()
        if k.endswith(".bias") and k.startswith("transformer.")
    ):
        # HF GPT-2 always has biases; ours exports a bias=False model with zero biases, which
        # is exactly a bias=False model: read it back as one.
        cfg = replace(cfg, bias=False)
    return cfg, from_hf_state_dict(cfg, hf_sd)


def _peek_model_type(path: Path) -> str | None:
    try:
        value = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value is not None else None
