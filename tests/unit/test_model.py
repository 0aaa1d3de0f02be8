"""The GPT model: sizes, masking, loss, GQA, checkpointing, KV-cache generation, sampling."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import GPT, GPTConfig, filter_logits, sample_next

REPO = Path(__file__).resolve().parents[2]

# Two tiny architectures that exercise every option. vocab 61 pads to 64, so there are three
# padded ids in every test.
GPT2_TINY = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)
LLAMA_TINY = dict(
    vocab_size=61,
    block_size=32,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
    bias=False,
    norm="rmsnorm",
    mlp="swiglu",
    pos_emb="rope",
    tie_embeddings=False,
)
# The options the open families add to Llama, all on: q/k/v biases (Qwen2), q/k norm and a
# head size apart from n_embd / n_head (Qwen3), llama3 RoPE frequencies (Llama 3.x).
OPEN_TINY = dict(
    LLAMA_TINY, qkv_bias=True, qk_norm=True, head_size=16, rope_scaling="llama3",
    rope_original_max_len=8, norm_eps=1e-6,
)  # fmt: skip
ARCHS = {"gpt2": GPT2_TINY, "llama": LLAMA_TINY, "open": OPEN_TINY}


def make(arch: str, seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**ARCHS[arch], **over}))


def rand_ids(model: GPT, B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)


# ------------------------------------------------------------------ sizes and configuration


def test_gpt2_124m_parameter_count_is_exact():
    # GPT-2 small as released: 50257 ids (no padding), tied embeddings, 1024 learned positions.
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, pad_vocab_to=1))
    assert model.num_params() == 124_439_808
    # Non-embedding: 12 blocks of (12*C^2 + 13*C) plus ln_f (2*C), C = 768.
    C = 768
    assert model.num_params(exclude_embeddings=True) == 12 * (12 * C * C + 13 * C) + 2 * C
    assert model.num_params(exclude_embeddings=True) == 85_056_000
    # nanoGPT's padding to 50304 adds 47 rows to the (tied) matrix only.
    with torch.device("meta"):
        padded = GPT(GPTConfig(vocab_size=50257))
    assert padded.cfg.padded_vocab_size == 50304
    assert padded.num_params() == 124_439_808 + 47 * C


def test_untied_and_gqa_parameter_count():
    cfg = GPTConfig(**LLAMA_TINY)
    model = GPT(cfg)
    C, H, Hkv, D, L = 32, 4, 2, 8, 2
    hidden = cfg.mlp_hidden_size
    assert hidden == 128  # 8/3 * 32 = 85.3, rounded up to a multiple of 64
    per_block = C * (H + 2 * Hkv) * D + C * C + 3 * C * hidden + 2 * C  # no biases, 2 RMSNorms
    body = L * per_block + C
    assert model.num_params(exclude_embeddings=True) == body
    assert model.num_params() == body + 2 * 64 * C  # untied: wte and lm_head both count
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    tied = make("gpt2")
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert "wpe" not in model.transformer and "wpe" in tied.transformer


def test_parameter_names_are_gpt2_like():
    names = set(dict(make("gpt2").named_parameters()))
    for n in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.bias",
    ]:
        assert n in names
    assert "lm_head.weight" in make("gpt2").state_dict()


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(vocab_size=0), "vocab_size is 0"),
        (dict(n_embd=30), "not divisible by model.n_head"),
        (dict(n_kv_head=3), "n_kv_head dividing n_head"),
        (dict(n_kv_head=8), "n_kv_head dividing n_head"),
        (dict(norm="batchnorm"), "model.norm='batchnorm'"),
        (dict(mlp="relu"), "model.mlp='relu'"),
        (dict(pos_emb="alibi"), "model.pos_emb='alibi'"),
        (dict(pos_emb="rope", n_embd=36, n_head=4), "head_dim"),
        (dict(qkv_bias=True), "model.bias=true has them already"),
        (dict(rope_scaling="yarn"), "model.rope_scaling='yarn'"),
        (dict(rope_scaling="llama3"), "it needs model.pos_emb=rope"),
        (dict(pos_emb="rope", rope_scaling="llama3", rope_low_freq_factor=4.0), "llama3 rope"),
        (dict(sliding_window=16), "the window would bind"),
        (dict(sliding_window=-1), "sliding_window must be >= 0"),
        (dict(hf_model_type="gemma"), "model.hf_model_type='gemma'"),
    ],
)
def test_bad_config_is_refused_with_a_clear_error(over, message):
    with pytest.raises(ValueError, match=message):
        GPT(GPTConfig(**{**GPT2_TINY, **over}))


def test_validate_can_defer_vocab_and_mapping_input():
    GPTConfig(vocab_size=0).validate(require_vocab=False)  # other fields fine: no error
    model = GPT(dict(GPT2_TINY))  # plain mappings (e.g. an OmegaConf DictConfig) are accepted
    assert model.cfg.vocab_size == 61
    with pytest.raises(ValueError, match="unknown model config keys"):
        GPT({**GPT2_TINY, "n_layers": 3})


def test_presets_are_valid_gptconfig_overrides():
    from omegaconf import OmegaConf

    presets = sorted((REPO / "conf" / "model").glob("*.yaml"))
    names = {p.stem for p in presets}
    assert {"tiny", "debug", "small10m", "gpt2-124m", "llama-160m"} <= names
    body = {}
    for p in presets:
        merged = OmegaConf.merge(OmegaConf.structured(GPTConfig), OmegaConf.load(p))
        merged.vocab_size = 50257
        cfg = OmegaConf.to_object(merged)
        with torch.device("meta"):
            body[p.stem] = GPT(cfg).num_params(exclude_embeddings=True)
    assert 1_000_000 <= body["tiny"] <= 2_000_000
    assert body["debug"] < body["tiny"]
    assert 9_000_000 <= body["small10m"] <= 12_000_000
    assert body["gpt2-124m"] == 85_056_000


def test_init_follows_gpt2():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, n_layer=8, n_head=4, n_embd=256, block_size=16)
    model = GPT(cfg)
    blk = model.transformer.h[3]
    assert torch.all(blk.attn.c_attn.bias == 0) and torch.all(blk.ln_1.weight == 1)
    std = blk.attn.c_attn.weight.std().item()
    resid_std = blk.mlp.c_proj.weight.std().item()
    assert abs(std - 0.02) / 0.02 < 0.05
    assert abs(resid_std - 0.02 / math.sqrt(16)) / (0.02 / 4) < 0.05


def test_meta_init_then_materialise():
    with torch.device("meta"):
        model = GPT(GPTConfig(**GPT2_TINY))
    model.to_empty(device="cpu")
    # Materialising gives each module a new parameter: the tied matrix is tied again.
    assert model.lm_head.weight is model.transformer.wte.weight
    model.init_weights(seed=7)
    reference = GPT(GPTConfig(**GPT2_TINY), seed=7)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    _, loss = model(rand_ids(model, 2, 8), rand_ids(model, 2, 8, seed=2))
    # A freshly initialised model predicts ~uniformly over the 61 real ids.
    assert abs(loss.item() - math.log(61)) < 0.2


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_values_are_a_pure_function_of_seed_and_name(arch):
    cfg = GPTConfig(**ARCHS[arch])
    a, b = GPT(cfg, seed=11), GPT(cfg, seed=11)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p, a.initial_value(name, 11)), name
    assert not torch.equal(GPT(cfg, seed=12).transformer.wte.weight, a.transformer.wte.weight)
    # A parameter's draw depends on nothing else: not on how many blocks come before or after
    # it (a rank that builds only its shard computes the same values), nor on the global RNG.
    deeper = GPT(GPTConfig(**{**ARCHS[arch], "n_layer": 3}), seed=11)
    assert torch.equal(deeper.transformer.wte.weight, a.transformer.wte.weight)
    assert torch.equal(
        deeper.transformer.h[1].attn.c_attn.weight, a.transformer.h[1].attn.c_attn.weight
    )
    # Without a seed, one is drawn from torch's generator: manual_seed makes it reproducible.
    torch.manual_seed(3)
    c = GPT(cfg)
    torch.manual_seed(3)
    assert torch.equal(GPT(cfg).transformer.wte.weight, c.transformer.wte.weight)
    rules = a.init_rules()
    assert set(rules) == {n for n, _ in a.named_parameters()}  # a tied matrix once
    # A model on the meta device (planners, FLOP counters) does not touch torch's generator:
    # a resumed run's restored RNG stream must not move.
    state = torch.get_rng_state()
    with torch.device("meta"):
        GPT(cfg)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ forward, loss, masking


def reference_loss(model: GPT, idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The loss as it is computed without chunking: full fp32 logits, padded ids at -inf."""
    logits, _ = model(idx)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_cross_entropy_of_the_logits_and_padding_is_masked(arch):
    model = make(arch)
    model.lm_head.chunk_bytes = 4 * 61 * 7  # 7 rows of logits at a time: 5 chunks of 30 rows
    idx, tgt = rand_ids(model, 3, 10), rand_ids(model, 3, 10, seed=2)
    tgt[0, :4] = -1  # ignored positions
    logits, none = model(idx)
    assert none is None
    assert logits.shape == (3, 10, 64) and logits.dtype == torch.float32
    # padded ids have -inf logits, real ids finite
    assert torch.isneginf(logits[..., 61:]).all() and torch.isfinite(logits[..., :61]).all()
    nothing, loss = model(idx, tgt)
    assert nothing is None  # with targets, the logits are never materialised
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # The same mean over 26 terms, summed in another order: fp32 rounding, 26 * eps.
    eps = torch.finfo(torch.float32).eps
    ref = reference_loss(model, idx, tgt)
    torch.testing.assert_close(loss, ref, rtol=26 * eps, atol=0)
    # ...which is exactly the loss of a 61-way softmax: padding changes nothing.
    real = F.cross_entropy(logits[..., :61].reshape(-1, 61), tgt.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, real, rtol=26 * eps, atol=0)
    loss.backward()
    # no gradient reaches the output rows of padded ids
    assert torch.all(model.lm_head.weight.grad[61:] == 0)
    assert model.lm_head.weight.grad[:61].abs().sum() > 0


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_and_gradients_equal_the_full_logits(arch, mode):
    """Every parameter's gradient through the chunked loss equals the one through the full
    [B, T, V] logits: in fp32 up to summation order, in bf16 up to bf16 rounding."""
    model = make(arch)
    if mode == "bf16":
        model = model.to(torch.bfloat16)  # as DeepSpeed and FSDP's param_dtype run it
    idx, tgt = rand_ids(model, 4, 16), rand_ids(model, 4, 16, seed=2)
    tgt[1, 3:9] = -1
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if mode == "autocast"
        else contextlib.nullcontext()
    )

    def run(chunked: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.lm_head.chunk_bytes = 4 * 61 * 5 if chunked else 2**40  # 5 rows, or all at once
        with ctx:
            loss = model(idx, tgt)[1] if chunked else reference_loss(model, idx, tgt)
        loss.backward()
        return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    loss, grads = run(True)
    ref_loss, ref_grads = run(False)
    # fp32: every value is a sum of at most K = 4C (the widest reduction, the MLP) terms taken
    # in another order: relative error <= K * eps32. bf16: the gradient of the hidden states
    # is rounded to bf16 (eps 2^-8) at another point (per chunk, before the 1/n scaling), about
    # one bf16 ulp per element, carried back through the blocks in bf16: a few ulps, 8 * eps.
    if mode == "fp32":
        tol = 4 * model.cfg.n_embd * torch.finfo(torch.float32).eps
    else:
        tol = 8 * torch.finfo(torch.bfloat16).eps
    assert abs(loss - ref_loss) <= tol * ref_loss.abs()
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= tol * g.norm(), name


def test_loss_is_float32_under_bf16_autocast():
    model = make("llama")
    idx = rand_ids(model, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx)
        _, loss = model(idx, idx)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    ref = model(idx, idx)[1]
    assert abs(loss.item() - ref.item()) < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_is_causal(arch):
    model = make(arch).eval()
    idx = rand_ids(model, 2, 16)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 61
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)  # the past cannot see it
    diff = (a[:, 9:, :61] - b[:, 9:, :61]).abs()  # real ids (padded ones are -inf in both)
    assert (diff.amax(dim=-1) > 1e-4).all()  # every later position does


def test_sequence_longer_than_block_size_is_refused():
    model = make("gpt2")
    with pytest.raises(ValueError, match="longer than block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_gqa_matches_explicit_repeated_heads():
    model = make("llama").eval()
    attn = model.transformer.h[0].attn
    C, H, Hkv, D = 32, 4, 2, 8
    assert attn.c_attn.weight.shape == ((H + 2 * Hkv) * D, C)
    x = torch.randn(2, 7, C, generator=torch.Generator().manual_seed(3))
    from pretrain.model import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(torch.arange(7), model.cfg)
    y = attn(x, (cos, sin))
    assert y.shape == (2, 7, C)
    # Reference: repeat each kv head for its group of H/Hkv query heads, plain softmax attention.
    q, k, v = attn.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = apply_rope(q.view(2, 7, H, D).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(2, 7, Hkv, D).transpose(1, 2), cos, sin)
    v = v.view(2, 7, Hkv, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, C)
    torch.testing.assert_close(y, attn.c_proj(ref), rtol=1e-5, atol=1e-5)


def test_open_family_options_are_switches_of_one_attention():
    """q/k/v biases, q/k norm (per head, before RoPE, one [D] gain each) and an explicit head
    size, against attention written out by hand."""
    model = make("open").eval()
    attn = model.transformer.h[0].attn
    C, H, Hkv, D, T = 32, 4, 2, 16, 7
    assert attn.c_attn.bias.shape == ((H + 2 * Hkv) * D,) and attn.c_proj.bias is None
    assert model.transformer.h[0].mlp.c_fc.bias is None
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (D,)
    assert model.init_rules()["transformer.h.0.attn.q_norm.weight"] == ("ones", 0.0)
    with torch.no_grad():  # gains away from 1, so a norm applied in the wrong place shows
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    from pretrain.model import apply_rope, rope_cos_sin

    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_cos_sin(torch.arange(T), model.cfg)
    y = attn(x, (cos, sin))

    def rms(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps) * w

    q, k, v = attn.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = apply_rope(rms(q.view(2, T, H, D), attn.q_norm.weight).transpose(1, 2), cos, sin)
    k = apply_rope(rms(k.view(2, T, Hkv, D), attn.k_norm.weight).transpose(1, 2), cos, sin)
    v = v.view(2, T, Hkv, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(
        torch.ones(T, T).triu(1).bool(), float("-inf")
    )
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, H * D)
    torch.testing.assert_close(y, attn.c_proj(ref), rtol=1e-5, atol=1e-5)


def test_generation_cache_holds_only_what_it_needs(monkeypatch: pytest.MonkeyPatch):
    """A 128k-position model (Llama 3.x) allocates its KV cache for the prompt and the new
    tokens, not for block_size: the same tokens as the uncached loop."""
    from pretrain.model import generate as generation

    sizes: list[int | None] = []
    real = generation.new_kv_cache
    monkeypatch.setattr(
        generation, "new_kv_cache", lambda cfg, n=None: sizes.append(n) or real(cfg, n)
    )
    model = make("open", block_size=131072)
    prompt = rand_ids(model, 2, 5)
    cached = model.generate(prompt, 6, temperature=0.0)
    assert sizes == [5 + 6 - 1]  # the last new token is sampled, never fed back
    assert torch.equal(cached, model.generate(prompt, 6, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_identical_loss_and_grads(arch):
    model = make(arch, dropout=0.1).train()
    idx, tgt = rand_ids(model, 2, 12), rand_ids(model, 2, 12, seed=2)
    results = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = ckpt
        torch.manual_seed(123)  # same dropout masks in both runs
        _, loss = model(idx, tgt)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0, msg=n)


def test_activation_checkpointing_really_checkpoints():
    # The recomputation must happen: count block forwards during one training step.
    model = make("gpt2").train()
    model.activation_checkpointing = True
    calls = []
    mlp = model.transformer.h[0].mlp
    inner = mlp.forward

    def counting_forward(x):
        calls.append(1)
        return inner(x)

    mlp.forward = counting_forward
    _, loss = model(rand_ids(model, 1, 8), rand_ids(model, 1, 8))
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # the block was re-run in the backward pass


# ------------------------------------------------------------------ KV cache and generation


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_logits_match_full_forward_step_by_step(arch):
    model = make(arch).eval()
    idx = rand_ids(model, 2, 20)
    with torch.no_grad():
        full, _ = model(idx)  # [2, 20, 64]
        cache = model.new_kv_cache()
        # prefill 6, then a chunk of 5 (exercises the offset mask), then one token at a time
        pieces = [model(idx[:, :6], kv_cache=cache)[0], model(idx[:, 6:11], kv_cache=cache)[0]]
        for t in range(11, 20):
            pieces.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
        assert cache.pos == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_and_uncached_greedy_generation_agree(arch):
    model = make(arch)
    prompt = rand_ids(model, 3, 5)
    with torch.no_grad():
        a = model.generate(prompt, 20, temperature=0.0, use_cache=True)
        b = model.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert a.shape == (3, 25)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)
    # Sampling with the same generator seed also agrees token for token.
    s1 = model.generate(prompt, 12, top_k=10, generator=torch.Generator().manual_seed(7))
    s2 = model.generate(
        prompt, 12, top_k=10, use_cache=False, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(s1, s2)


def test_generation_at_block_size_limit():
    model = make("gpt2")  # block_size 32
    prompt = rand_ids(model, 1, 30)
    cached = model.generate(prompt, 10, temperature=0.0)
    # The cache holds 32 positions: 30 of prompt + 2 fed back, so 3 new tokens, then it stops.
    assert cached.shape == (1, 33)
    uncached = model.generate(prompt, 10, temperature=0.0, use_cache=False)
    assert uncached.shape == (1, 40)  # crops its context to the last 32 tokens and goes on
    assert torch.equal(cached, uncached[:, :33])
    # A prompt longer than block_size is cropped to its last 32 tokens.
    long = rand_ids(model, 1, 40)
    assert torch.equal(
        model.generate(long, 1, temperature=0.0),
        model.generate(long, 1, temperature=0.0, use_cache=False),
    )


def test_generate_restores_training_mode():
    model = make("gpt2", dropout=0.5).train()
    prompt = rand_ids(model, 1, 4)
    a = model.generate(prompt, 8, temperature=0.0)
    b = model.generate(prompt, 8, temperature=0.0)
    assert torch.equal(a, b)  # dropout was off while generating
    assert model.training


def test_eos_stops_rows_and_generation():
    model = make("gpt2")
    prompt = rand_ids(model, 2, 4)
    free = model.generate(prompt, 10, temperature=0.0)
    eos = int(free[0, 6])  # row 0's third greedy token becomes the end-of-sequence id
    out = model.generate(prompt, 10, temperature=0.0, eos_id=eos)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])
    assert out[0, : 4 + first].tolist() == free[0, : 4 + first].tolist()
    if eos not in free[1, 4:].tolist():  # row 1 never finishes: it runs the full length
        assert out.shape == (2, 14)
        assert torch.equal(out[1], free[1])


def test_padded_vocab_is_never_sampled():
    model = make("gpt2").eval()  # vocab 61 padded to 64
    with torch.no_grad():
        # Make the padded output rows win by a mile if they were not masked: the final norm
        # outputs the same vector b everywhere and the padded rows point along b.
        ln_f = model.transformer.ln_f
        ln_f.weight.zero_()
        ln_f.bias.copy_(torch.linspace(-1, 1, 32))
        model.lm_head.weight[61:] = 100 * ln_f.bias
        logits, _ = model(rand_ids(model, 1, 4))
        assert torch.isneginf(logits[..., 61:]).all()
        out = model.generate(
            rand_ids(model, 4, 2), 25, temperature=2.0, generator=torch.Generator().manual_seed(0)
        )
    assert out.max() < 61


# ------------------------------------------------------------------ sampling


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = make("llama")
    prompt = rand_ids(model, 2, 3)
    greedy = model.generate(prompt, 10, temperature=0.0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        out = model.generate(
            prompt, 10, temperature=1.5, generator=torch.Generator().manual_seed(0), **kw
        )
        assert torch.equal(out, greedy), kw


def test_sampled_ids_are_in_the_top_k_set():
    logits = torch.randn(3, 61, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    seen = [set() for _ in range(3)]
    for _ in range(200):
        ids = sample_next(logits, temperature=3.0, top_k=5, generator=g)
        for r in range(3):
            assert ids[r].item() in allowed[r].tolist()
            seen[r].add(ids[r].item())
    assert all(len(s) == 5 for s in seen)  # at temperature 3 every allowed id shows up


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [1]  # the top token alone already has 0.5 >= 0.4
    assert kept(0.75) == [1, 3]  # 0.5 + 0.3
    assert kept(0.9) == [1, 2, 3]  # 0.95 needed
    assert kept(1.0) == [0, 1, 2, 3]
    # renormalised probabilities inside the nucleus are proportional to the originals
    p = filter_logits(logits, top_p=0.75).softmax(-1)[0]
    torch.testing.assert_close(p, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    # top-k then top-p
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0)).sum() == 3
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)
