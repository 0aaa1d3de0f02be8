"""`GPTConfig`: the architecture of a GPT, its checks and its derived sizes.

Every switch of the network is a field here, and the network reads nothing else: a variant of
the architecture is a set of values of these fields, checked in one place (`validate`) with an
error that names the field and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POS_EMBS = ("learned", "rope")
ROPE_SCALINGS = ("none", "llama3")
# The transformers model types a model can be exported as (`hf_model_type`); pretrain.hf maps
# each of them both ways.
HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
# SwiGLU hidden width is rounded up to a multiple of this (see GPTConfig.mlp_hidden_size).
SWIGLU_MULTIPLE_OF = 64


@dataclass
class GPTConfig:
    """Architecture of a GPT. Also the Hydra structured config of the `model` group: every
    field has a default (plain str/int/float/bool, two int lists), so presets only list what
    they change."""

    vocab_size: int = 0
    """Vocabulary size of the tokenizer; 0 = take it from the data manifest (filled in before
    the model is built; the model refuses 0)."""
    block_size: int = 1024
    """Maximum sequence length: size of the learned position table, longest RoPE position."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of query heads; n_embd must be divisible by it (head_dim = n_embd / n_head)."""
    n_kv_head: int = 0
    """Number of key/value heads; 0 = n_head (plain multi-head attention), fewer = GQA."""
    n_embd: int = 768
    """Residual stream width (model dimension)."""
    mlp_hidden: int = 0
    """MLP hidden width; 0 = 4*n_embd for gelu, 8/3*n_embd rounded up to a multiple of 64 for
    swiglu (same parameter count as a 4x GELU MLP, as in Llama)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorm (GPT-2: True; Llama: False)."""
    norm: str = "layernorm"
    """Normalisation layer: "layernorm" or "rmsnorm"."""
    mlp: str = "gelu"
    """MLP type: "gelu" (GPT-2, tanh approximation) or "swiglu" (Llama)."""
    pos_emb: str = "learned"
    """Position encoding: "learned" (absolute table) or "rope" (rotary, on q and k)."""
    rope_theta: float = 10000.0
    """RoPE base: frequencies are rope_theta ** (-2i / head_dim)."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the output projection."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm/RMSNorm."""
    init_std: float = 0.02
    """Std of the normal init of weights; residual projections get init_std/sqrt(2*n_layer)."""
    pad_vocab_to: int = 64
    """Round the embedding/output rows up to a multiple of this (1 = no padding). Padded logits
    are masked to -inf, so they never carry probability."""
    head_size: int = 0
    """Channels per attention head; 0 = n_embd / n_head. A model whose heads were pruned away
    keeps its head size with fewer heads (n_head * head_size < n_embd)."""
    layer_heads: list[int] = field(default_factory=list)
    """Query heads of each block, one entry per layer (empty = n_head in every layer): a model
    pruned to different shapes per layer. Each entry is a multiple of the key/value heads."""
    layer_mlp_hidden: list[int] = field(default_factory=list)
    """MLP hidden width of each block, one entry per layer (empty = mlp_hidden_size in every
    layer)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections only (Qwen2), in a model without other
    biases (bias=false; with bias=true they are there already)."""
    qk_norm: bool = False
    """RMSNorm of every head's query and key before RoPE (Qwen3): one [head_dim] gain for the
    queries and one for the keys, shared by the heads."""
    rope_scaling: str = "none"
    """RoPE frequency rule: "none" (rope_theta ** (-2i / head_dim)) or "llama3" (Llama 3.1+:
    wavelengths longer than rope_original_max_len / rope_low_freq_factor are rope_factor times
    longer, those shorter than rope_original_max_len / rope_high_freq_factor are kept, and a
    smooth ramp joins the two)."""
    rope_factor: float = 8.0
    """llama3 rope_scaling: how many times longer the long wavelengths become."""
    rope_low_freq_factor: float = 1.0
    """llama3 rope_scaling: wavelengths above rope_original_max_len / this are scaled fully."""
    rope_high_freq_factor: float = 4.0
    """llama3 rope_scaling: wavelengths below rope_original_max_len / this are not scaled."""
    rope_original_max_len: int = 8192
    """llama3 rope_scaling: the context length the model was first trained at."""
    sliding_window: int = 0
    """Attention window of a source model (Mistral: a query sees its last sliding_window keys);
    0 = none. Only a window that never binds is computed: it must be >= block_size, so every
    sequence gets the full causal mask (longer ones are refused)."""
    hf_model_type: str = ""
    """The transformers model type to export as (gpt2, llama, mistral, qwen2, qwen3); empty =
    derived from the options: gpt2 for learned positions, llama for RoPE (qwen2 with qkv_bias,
    qwen3 with qk_norm, mistral with a sliding_window). Reading an HF directory sets it where
    that rule would derive another type (a Mistral without a window)."""

    # -- derived sizes (properties, not fields: Hydra ignores them) ---------------------------

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_head, or n_head when 0)."""
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    def heads_of(self, layer: int) -> int:
        """Query heads of block `layer`."""
        return self.layer_heads[layer] if self.layer_heads else self.n_head

    def kv_heads_of(self, layer: int) -> int:
        """Key/value heads of block `layer` (n_kv_head, or its query heads when 0)."""
        return self.n_kv_head or self.heads_of(layer)

    def mlp_hidden_of(self, layer: int) -> int:
        """MLP hidden width of block `layer`."""
        return self.layer_mlp_hidden[layer] if self.layer_mlp_hidden else self.mlp_hidden_size

    @property
    def uniform(self) -> bool:
        """Whether every block has the same shape (no per-layer lists)."""
        return not self.layer_heads and not self.layer_mlp_hidden

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output matrices: vocab_size rounded up to pad_vocab_to."""
        m = max(1, self.pad_vocab_to)
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def mlp_hidden_size(self) -> int:
        """MLP hidden width after resolving mlp_hidden = 0.

        gelu: 4*n_embd (GPT-2). swiglu: SwiGLU has three matrices instead of two, so Llama
        shrinks the width to 2/3 * 4*n_embd to keep the parameter count of a 4x MLP, then rounds
        up for fast matmuls. Llama rounds to 256; we round to 64, which is just as friendly to
        tensor cores but does not inflate small models (n_embd=128: 384 instead of 512)."""
        if self.mlp_hidden > 0:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            hidden = int(2 * 4 * self.n_embd / 3)
            return SWIGLU_MULTIPLE_OF * math.ceil(hidden / SWIGLU_MULTIPLE_OF)
        return 4 * self.n_embd

    def validate(self, require_vocab: bool = True) -> GPTConfig:
        """Raise ValueError naming the bad field and the fix; return self when all is well.

        `require_vocab=False` checks everything but vocab_size, for configs whose vocabulary is
        filled in from the data later."""
        errors: list[str] = []
        if require_vocab and self.vocab_size <= 0:
            errors.append(
                f"model.vocab_size is {self.vocab_size}: set it to the tokenizer's vocabulary "
                "size (model.vocab_size=N), or leave it 0 in the config and let the training "
                "loop fill it in from the data manifest before the model is built"
            )
        if self.vocab_size < 0:
            errors.append(f"model.vocab_size must be >= 0, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                errors.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.head_size < 0:
            errors.append(
                f"model.head_size must be >= 0 (0 = n_embd / n_head), got {self.head_size}"
            )
        elif self.head_size == 0 and self.n_head > 0 and self.n_embd % self.n_head != 0:
            errors.append(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "choose n_head dividing n_embd (head_dim = n_embd / n_head)"
            )
        for name in ("layer_heads", "layer_mlp_hidden"):
            values = list(getattr(self, name))
            if values and (len(values) != self.n_layer or min(values) <= 0):
                errors.append(
                    f"model.{name}={values} must hold one positive entry per layer "
                    f"(n_layer={self.n_layer}), or be empty (the same in every layer)"
                )
        if self.n_kv_head > 0 and any(h % self.n_kv_head for h in self.layer_heads):
            errors.append(
                f"model.layer_heads={list(self.layer_heads)}: every entry must be a multiple of "
                f"model.n_kv_head={self.n_kv_head} (each key/value head serves a whole group)"
            )
        if self.n_kv_head < 0:
            errors.append(f"model.n_kv_head must be >= 0 (0 = n_head), got {self.n_kv_head}")
        elif self.n_head > 0 and (self.kv_heads > self.n_head or self.n_head % self.kv_heads != 0):
            errors.append(
                f"model.n_head={self.n_head} is not a multiple of model.n_kv_head="
                f"{self.n_kv_head}: grouped-query attention shares each key/value head among "
                "n_head/n_kv_head query heads, so pick n_kv_head dividing n_head (0 = n_head)"
            )
        if self.mlp_hidden < 0:
            errors.append(
                f"model.mlp_hidden must be >= 0 (0 = default rule), got {self.mlp_hidden}"
            )
        if self.norm not in NORMS:
            errors.append(f"model.norm={self.norm!r} is not one of {NORMS}")
        if self.mlp not in MLPS:
            errors.append(f"model.mlp={self.mlp!r} is not one of {MLPS}")
        if self.pos_emb not in POS_EMBS:
            errors.append(f"model.pos_emb={self.pos_emb!r} is not one of {POS_EMBS}")
        if (
            self.pos_emb == "rope"
            and self.n_head > 0
            and (self.head_size > 0 or self.n_embd % self.n_head == 0)
            and self.head_dim % 2 != 0
        ):
            errors.append(
                f"RoPE rotates pairs of channels, so head_dim (head_size, or n_embd/n_head) must "
                f"be even; got {self.head_dim} (n_embd={self.n_embd}, n_head={self.n_head})"
            )
        if self.pos_emb == "rope" and self.rope_theta <= 0:
            errors.append(f"model.rope_theta must be > 0, got {self.rope_theta}")
        errors += self._family_errors()
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            errors.append(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            errors.append(f"model.init_std must be > 0, got {self.init_std}")
        if self.pad_vocab_to < 1:
            errors.append(
                f"model.pad_vocab_to must be >= 1 (1 = no padding), got {self.pad_vocab_to}"
            )
        if errors:
            raise ValueError("invalid model config:\n  - " + "\n  - ".join(errors))
        return self

    def _family_errors(self) -> list[str]:
        """The checks of the options that open model families differ by (validate's part)."""
        errors: list[str] = []
        if self.qkv_bias and self.bias:
            errors.append(
                "model.qkv_bias=true adds query/key/value biases to a model without biases; "
                "model.bias=true has them already: leave qkv_bias false"
            )
        if self.rope_scaling not in ROPE_SCALINGS:
            errors.append(f"model.rope_scaling={self.rope_scaling!r} is not one of {ROPE_SCALINGS}")
        elif self.rope_scaling != "none" and self.pos_emb != "rope":
            errors.append(
                f"model.rope_scaling={self.rope_scaling} scales RoPE frequencies: it needs "
                "model.pos_emb=rope"
            )
        if self.rope_scaling == "llama3" and not (
            self.rope_factor > 0
            and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
            and self.rope_original_max_len > 0
        ):
            errors.append(
                "llama3 rope_scaling needs model.rope_factor > 0, 0 < model.rope_low_freq_factor "
                "< model.rope_high_freq_factor and model.rope_original_max_len > 0; got "
                f"{self.rope_factor}, {self.rope_low_freq_factor}, {self.rope_high_freq_factor}, "
                f"{self.rope_original_max_len}"
            )
        if self.sliding_window < 0:
            errors.append(
                f"model.sliding_window must be >= 0 (0 = none), got {self.sliding_window}"
            )
        elif 0 < self.sliding_window < self.block_size:
            errors.append(
                f"model.sliding_window={self.sliding_window} < model.block_size="
                f"{self.block_size}: the window would bind on longer sequences, and only a full "
                "causal mask is computed; set model.block_size <= model.sliding_window"
            )
        if self.hf_model_type not in ("", *HF_MODEL_TYPES):
            errors.append(
                f"model.hf_model_type={self.hf_model_type!r} is not one of {HF_MODEL_TYPES} "
                "(or empty: derived from the options)"
            )
        return errors

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> GPTConfig:
        """Build from a dict or an OmegaConf DictConfig (anything with .keys()/[]), with a clear
        error for unknown keys instead of a bare TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(m.keys()) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**{k: m[k] for k in m})
