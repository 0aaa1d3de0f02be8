"""Training FLOPs per token, accelerator peak FLOP/s and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s, where "model FLOPs" are the FLOPs the model needs
per token for one forward + backward pass (PaLM, Chowdhery et al. 2022, appendix B):

    flops_per_token = 6 * N + 12 * L * H * Q * T

- 6N: each weight matrix entry does one multiply-add (2 FLOPs) per token in the forward pass
  and two in the backward pass (gradients w.r.t. the input and w.r.t. the weight): 2 + 4 = 6.
- 12*L*H*Q*T: attention scores q.k^T and the weighted sum of values, 2 matmuls of
  2*H*Q*T FLOPs per token and layer forward, times 3 for forward + backward. L = n_layer,
  H = n_head (query heads, also with GQA), Q = head_dim (model.head_size where it is set apart
  from n_embd / n_head, as Qwen3's), T = sequence length. The causal mask
  is ignored (full T, as in PaLM), so kernels that skip the masked half do not raise MFU.

Which parameters are N. PaLM takes "N = number of parameters" of a model with no position table
and tied embeddings; what matters is that N counts exactly the weights used in a matmul per
token. Here:

    N = model.num_params(exclude_embeddings=True)   # blocks + final norm
      + padded_vocab_size * n_embd                  # the output projection (lm_head)

The token and position embeddings are lookups (no FLOPs worth counting) and are left out; the
output projection is a [C, V] matmul per token and is counted, whether or not it shares its
storage with the token embedding. For a tied model (GPT-2) this is exactly nanoGPT's
`estimate_mfu` (N = all parameters minus the position table), and like nanoGPT we use the
padded vocabulary (50304 for GPT-2) because those are the columns the hardware multiplies.
Norm weights and biases are in N too (elementwise, negligible, as in nanoGPT).

Not counted, by convention: activation-checkpointing recomputation (that would be hardware
FLOPs utilisation, HFU), softmax/norm/activation elementwise work, the optimizer step.
"""

from __future__ import annotations

import time

import torch

from pretrain.engine.precision import DTYPES
from pretrain.model import GPT, GPTConfig


def matmul_params(cfg: GPTConfig) -> int:
    """N of the PaLM formula: non-embedding parameters + the output projection (see module
    docstring). Counted exactly by building the model on the meta device (no memory, no
    compute), so it can never drift from the architecture."""
    with torch.device("meta"):
        model = GPT(cfg)
    return model.num_params(exclude_embeddings=True) + cfg.padded_vocab_size * cfg.n_embd


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token (forward + backward) at sequence length seq_len:
    6*N + 12*n_layer*n_head*head_dim*seq_len (PaLM appendix B; N per `matmul_params`)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = matmul_params(cfg)
    heads = sum(cfg.heads_of(i) for i in range(cfg.n_layer))  # n_layer * n_head unless pruned
    attn = 12 * heads * cfg.head_dim * seq_len
    return float(6 * n + attn)


# Dense (no 2:4 sparsity) peak FLOP/s from the vendors' datasheets, per device, per dtype:
# "bf16"/"fp16" = tensor-core matmul with fp32 accumulation (what mixed-precision training
# uses), "fp32" = plain FP32 (CUDA cores, no TF32). A dtype missing from a row means the device
# has no fast path for it (bf16 on V100/T4 is emulated): peak_flops then returns None.
# Matched by case-insensitive substring of torch.cuda.get_device_name(); the FIRST matching row
# wins, so more specific names come before names they contain ("H100 PCIe" before "H100",
# "GH200" before "H200", "L40S" before "L40" before "L4", "A100" and "A10G" before "A10").
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM ("H100 80GB HBM3")
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),  # SXM and PCIe alike
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12}),  # AWS variant of the A10
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("A6000", {"bf16": 154.8e12, "fp16": 154.8e12, "fp32": 38.7e12}),  # RTX A6000
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2 figures; no bf16 tensor cores
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
    ("RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
]

# The names a precision goes by: ours (`DTYPES`), torch's with and without its prefix, and the
# other tools' (Lightning's "-mixed", Accelerate's mixed_precision="no").
_DTYPE_ALIASES = {
    **{name: name for name in DTYPES},
    **{str(dt): name for name, dt in DTYPES.items()},
    **{str(dt).removeprefix("torch."): name for name, dt in DTYPES.items()},
    "bf16-mixed": "bf16",
    "fp16-mixed": "fp16",
    "half": "fp16",
    "float": "fp32",
    "no": "fp32",
}


def _canonical_dtype(dtype: str | torch.dtype) -> str:
    key = str(dtype).lower()
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of bf16, fp16, fp32")
    return _DTYPE_ALIASES[key]


def peak_flops(device_name: str, dtype: str | torch.dtype) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in `dtype` (bf16/fp16/fp32 or a torch
    dtype), looked up in PEAK_FLOPS by substring of `device_name`; None when the device or
    the dtype on it is unknown (CPUs included: measure with `measure_matmul_flops`)."""
    name = device_name.lower()
    dt = _canonical_dtype(dtype)
    for pattern, table in PEAK_FLOPS:
        if pattern.lower() in name:
            return table.get(dt)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1]: tokens_per_s * flops_per_token / peak.

    tokens_per_s and peak must describe the same hardware: per device (tokens/s of one rank
    and one device's peak) or all devices (global tokens/s and world_size * peak)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak


def measure_matmul_flops(
    n: int = 2048,
    dtype: torch.dtype = torch.float32,
    iters: int = 10,
    device: str | torch.device = "cpu",
    warmup: int = 2,
) -> float:
    """Measured FLOP/s of an n x n @ n x n matmul (2*n^3 FLOPs) on `device`: the practical
    ceiling of this machine, used as the "peak" where no datasheet figure applies (CPUs).
    Takes the best of `iters` timed runs, after `warmup` untimed ones."""
    dev = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        a @ b
    sync()
    best = float("inf")
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
