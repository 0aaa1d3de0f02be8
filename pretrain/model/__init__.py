"""The GPT model, pure PyTorch: GPT-2 by default, with switches for the Llama-style options.

The package holds one network and the pieces around it, each in its own module:

    config.py    `GPTConfig`: every architecture switch, its checks (`validate`) and the sizes
                 derived from it (head size, MLP width, padded vocabulary, per-layer shapes).
                 The network reads its options from here only.
    gpt.py       the network: `RMSNorm`/LayerNorm, rotary position embeddings (their one
                 frequency rule `rope_frequencies`, `rope_cos_sin`, `apply_rope`),
                 `CausalSelfAttention`, `MLP`, `Block` and the `GPT` module (parameter
                 layout and shapes in its docstring).
    loss.py      the output projection `LMHead` and the chunked cross-entropy, which never
                 materialises the [B, T, V] fp32 logits during training.
    init.py      initial values, a pure function of a seed and each parameter's name
                 (`param_seed`, the GPT-2 rules), so a rank holding a shard of a parameter
                 computes exactly what one process would.
    generate.py  the KV cache, top-k/top-p sampling (`filter_logits`, `sample_next`) and the
                 loop behind `GPT.generate`.

Nothing here imports the rest of the project (no engine, launcher or logging): the training
code builds a `GPT` from a `GPTConfig` and wraps it. The public names are re-exported here, so
`from pretrain.model import GPT, GPTConfig` is the usual import.
"""

from pretrain.model.config import (
    HF_MODEL_TYPES,
    MLPS,
    NORMS,
    POS_EMBS,
    ROPE_SCALINGS,
    SWIGLU_MULTIPLE_OF,
    GPTConfig,
)
from pretrain.model.generate import KVCache, filter_logits, sample_next
from pretrain.model.gpt import (
    GPT,
    MLP,
    Block,
    CausalSelfAttention,
    RMSNorm,
    apply_rope,
    make_norm,
    rope_cos_sin,
    rope_frequencies,
)
from pretrain.model.init import param_seed
from pretrain.model.loss import LOSS_CHUNK_BYTES, LMHead, chunked_cross_entropy

__all__ = [
    "GPT",
    "HF_MODEL_TYPES",
    "LOSS_CHUNK_BYTES",
    "MLP",
    "MLPS",
    "NORMS",
    "POS_EMBS",
    "ROPE_SCALINGS",
    "SWIGLU_MULTIPLE_OF",
    "Block",
    "CausalSelfAttention",
    "GPTConfig",
    "KVCache",
    "LMHead",
    "RMSNorm",
    "apply_rope",
    "chunked_cross_entropy",
    "filter_logits",
    "make_norm",
    "param_seed",
    "rope_cos_sin",
    "rope_frequencies",
    "sample_next",
]
