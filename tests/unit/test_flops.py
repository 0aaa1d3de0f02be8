"""FLOPs per token (PaLM formula), the peak FLOP/s table and MFU."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.flops import (
    flops_per_token,
    matmul_params,
    measure_matmul_flops,
    mfu,
    peak_flops,
)
from pretrain.model import GPT, GPTConfig


def test_gpt2_124m_flops_per_token_is_pinned():
    # GPT-2 small, GPT-2 tokenizer padded to 50304 (as nanoGPT), T = 1024. By hand:
    C, L, H, T = 768, 12, 12, 1024
    block = 12 * C * C + 13 * C  # c_attn 3C^2+3C, attn c_proj C^2+C, MLP 8C^2+5C, 2 LayerNorms 4C
    assert block == 7_087_872
    N = L * block + 2 * C + 50304 * C  # blocks + ln_f + output projection (tied with wte)
    assert N == 123_689_472  # nanoGPT's "number of parameters: 123.69M"
    attention = 12 * L * H * (C // H) * T
    assert attention == 113_246_208
    cfg = GPTConfig(vocab_size=50257)  # the defaults are GPT-2 small
    assert matmul_params(cfg) == N
    assert flops_per_token(cfg, T) == 6 * N + attention == 855_383_040
    # Without vocabulary padding the output projection has 47 rows fewer.
    assert flops_per_token(GPTConfig(vocab_size=50257, pad_vocab_to=1), T) == 855_166_464
    # The attention term grows linearly with the sequence length.
    assert flops_per_token(cfg, 2048) - flops_per_token(cfg, 1024) == attention


def test_tied_n_is_nanogpt_count_and_untied_n_skips_the_input_embedding():
    tied = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(tied)
    assert matmul_params(tied) == model.num_params() - model.transformer.wpe.weight.numel()

    untied = GPTConfig(
        vocab_size=100,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_kv_head=1,
        n_embd=16,
        bias=False,
        norm="rmsnorm",
        mlp="swiglu",
        pos_emb="rope",
        tie_embeddings=False,
    )
    model = GPT(untied)
    assert matmul_params(untied) == model.num_params() - model.transformer.wte.weight.numel()
    # GQA shrinks N (fewer kv heads) but not the attention term: all 4 query heads attend.
    C, D, hidden = 16, 4, untied.mlp_hidden_size
    N = 2 * (C * (4 + 2 * 1) * D + C * C + 3 * C * hidden + 2 * C) + C + 128 * C
    assert flops_per_token(untied, 16) == 6 * N + 12 * 2 * 4 * D * 16


def test_attention_flops_use_the_explicit_head_size():
    """Qwen3's heads are wider than n_embd / n_head: the attention term counts their real
    width, and N counts the q/k norm gains and q/k/v biases with the rest."""
    cfg = GPTConfig(
        vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
        head_size=8, bias=False, qkv_bias=True, qk_norm=True, norm="rmsnorm", mlp="swiglu",
        pos_emb="rope",
    )  # fmt: skip
    model = GPT(cfg)
    assert matmul_params(cfg) == model.num_params()  # tied: the output projection once
    assert flops_per_token(cfg, 16) == 6 * model.num_params() + 12 * 2 * 4 * 8 * 16
    assert cfg.head_dim == 8 != cfg.n_embd // cfg.n_head


def test_flops_need_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        flops_per_token(GPTConfig(), 1024)


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "fp16", 835e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
        ("NVIDIA A10G", "bf16", 70e12),
        ("NVIDIA A10", "bf16", 125e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("Tesla V100-SXM2-16GB", "fp16", 125e12),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 tensor cores
        ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2e12),
        ("NVIDIA GeForce RTX 3090", "fp32", 35.6e12),
        ("cpu", "fp32", None),
        ("Some Future Accelerator", "bf16", None),
    ],
)
def test_peak_flops_table(name, dtype, expected):
    assert peak_flops(name, dtype) == expected


def test_peak_flops_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        peak_flops("NVIDIA H100", "int4")


def test_mfu():
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_measure_matmul_flops_is_a_real_measurement():
    f = measure_matmul_flops(n=256, iters=3)
    # Any machine that can run the suite does more than 100 MFLOP/s and less than 1 PFLOP/s in
    # fp32 on the CPU.
    assert math.isfinite(f) and 1e8 < f < 1e15
