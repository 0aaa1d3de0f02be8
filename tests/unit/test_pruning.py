"""Pruning: per-layer model shapes, global magnitude pruning, Taylor importance, structured
pruning to a smaller model that computes what the original computes with those units silenced,
and the mask a fine-tune keeps."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from pretrain import hf, pruning
from pretrain.model import GPT, GPTConfig
from pretrain.pruning import PruneError, Scores, Selection

GPT2 = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)
LLAMA = dict(
    vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, bias=False, norm="rmsnorm",
    mlp="swiglu", pos_emb="rope", mlp_hidden=48,
)  # fmt: skip
ARCHS = {
    "gpt2": GPT2,  # MHA with biases, tied
    "llama-gqa": dict(LLAMA, n_kv_head=2, tie_embeddings=False),
    "llama-mha": dict(LLAMA, tie_embeddings=True),
}
# fp32 logits of models 32 wide: the pruned model sums fewer terms in c_proj (the silenced ones
# are exact zeros in the original), the rest is the same arithmetic; differences of a few ulps
# of O(1) values, far below 1e-5.
ATOL = 1e-5


def make(arch: str, seed: int = 0, **over: object) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**ARCHS[arch], **over})).eval()
    with torch.no_grad():  # norm gains of 1 and zero biases would hide a misplaced row
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(B: int = 2, T: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the shapes a pruned model needs ---------------------------------------------------------


def test_per_layer_shapes_build_validate_and_round_trip() -> None:
    cfg = GPTConfig(
        **dict(LLAMA, n_kv_head=2, head_size=8, layer_heads=[2, 4], layer_mlp_hidden=[16, 40])
    )
    model = GPT(cfg)
    a0, a1 = model.transformer.h[0].attn, model.transformer.h[1].attn
    assert a0.c_attn.weight.shape == ((2 + 2 * 2) * 8, 32) and a0.c_proj.weight.shape == (32, 16)
    assert a1.c_attn.weight.shape == ((4 + 2 * 2) * 8, 32) and a1.c_proj.weight.shape == (32, 32)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (2 * 16, 32)
    assert model.transformer.h[1].mlp.c_proj.weight.shape == (32, 40)
    # The config travels as YAML (config.yaml of a run) and back.
    again = GPTConfig(**yaml.safe_load(yaml.safe_dump(cfg.__dict__)))
    assert again == cfg and GPT(again).state_dict().keys() == model.state_dict().keys()
    for bad, match in [
        (dict(layer_heads=[2]), "one positive entry per layer"),
        (dict(layer_mlp_hidden=[16, 0]), "one positive entry per layer"),
        (dict(layer_heads=[3, 4]), "multiple of model.n_kv_head=2"),
        (dict(head_size=-1), "head_size must be >= 0"),
        (dict(head_size=7), "RoPE rotates pairs"),
    ]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**{**LLAMA, "n_kv_head": 2, **bad}).validate()


def test_cached_generation_matches_uncached_with_per_layer_shapes() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA, head_size=8, layer_heads=[1, 3], layer_mlp_hidden=[8, 24]))
    prompt = ids(2, 5)
    a = model.generate(prompt, 12, temperature=0.0, use_cache=True)
    b = model.generate(prompt, 12, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def test_hf_mapping_of_pruned_shapes() -> None:
    llama = GPTConfig(**dict(LLAMA, n_head=2, head_size=8))  # 2 heads of 8 in a 32-wide model
    hc = hf.to_hf_config(llama, eos_id=2, pad_id=3)
    assert (hc.num_attention_heads, hc.head_dim) == (2, 8)
    assert hf.from_hf_config(hc) == llama.validate()
    with pytest.raises(hf.HFError, match="LlamaConfig requires it"):  # transformers' own rule
        hf.family(GPTConfig(**dict(LLAMA, n_head=3, head_size=8)))
    with pytest.raises(hf.HFError, match="GPT-2 derives the head size"):
        hf.family(GPTConfig(**dict(GPT2, n_head=3, head_size=8)))
    hf.family(GPTConfig(**dict(GPT2, mlp_hidden=40)))  # fewer MLP neurons: still GPT-2
    per_layer = GPTConfig(**dict(LLAMA, layer_mlp_hidden=[16, 40]))
    with pytest.raises(hf.HFError) as e:
        hf.family(per_layer)
    assert str(e.value).count("layers of different shapes") == 2  # neither class holds it


# ---- unstructured ----------------------------------------------------------------------------


def test_global_magnitude_pruning() -> None:
    model = make("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = pruning.prune_unstructured(model, 0.5)
    mats = {n + ".weight": m.weight for n, m in pruning.block_matmuls(model)}
    total = sum(w.numel() for w in mats.values())
    assert info["zeroed"] == round(0.5 * total) == sum(int((w == 0).sum()) for w in mats.values())
    assert len(mats) == 4 * 2
    # Global: one threshold over every block matrix, not half of each.
    kept = torch.cat([before[k][w != 0].abs() for k, w in mats.items()])
    gone = torch.cat([before[k][w == 0].abs() for k, w in mats.items()])
    assert gone.max() <= kept.min()
    assert len({round(float((w == 0).float().mean()), 3) for w in mats.values()}) > 1
    # Kept weights are untouched; nothing but block matmuls changed; plain names again.
    sd = model.state_dict()
    assert sd.keys() == before.keys()
    for k, v in sd.items():
        if k in mats:
            assert torch.equal(v[v != 0], before[k][v != 0])
        else:
            assert torch.equal(v, before[k]), k


# ---- structured ------------------------------------------------------------------------------


def scores_for(model: GPT, seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    return Scores(
        [torch.rand(cfg.heads_of(i), generator=g) for i in range(cfg.n_layer)],
        [torch.rand(cfg.mlp_hidden_of(i), generator=g) for i in range(cfg.n_layer)],
    )


def silenced(model: GPT, sel: Selection) -> GPT:
    """A copy of `model` whose removed heads and neurons write nothing: their columns of the
    output projections are zero. Computed independently of pruning.prune_structured."""
    import copy

    out = copy.deepcopy(model)
    D = model.cfg.head_dim
    with torch.no_grad():
        for i, block in enumerate(out.transformer.h):
            for h in set(range(model.cfg.heads_of(i))) - set(sel.heads[i]):
                block.attn.c_proj.weight[:, h * D : (h + 1) * D] = 0
            gone = sorted(set(range(model.cfg.mlp_hidden_of(i))) - set(sel.neurons[i]))
            block.mlp.c_proj.weight[:, gone] = 0
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("uniform", [True, False])
def test_structured_pruning_is_the_original_with_units_silenced(arch: str, uniform: bool) -> None:
    model = make(arch)
    cfg = model.cfg
    sel = pruning.select(cfg, scores_for(model), 0.5, uniform=uniform)
    small = pruning.prune_structured(model, sel)
    c = small.cfg
    for i, block in enumerate(small.transformer.h):
        H, Hkv, D = c.heads_of(i), c.kv_heads_of(i), c.head_dim
        assert len(sel.heads[i]) == H and cfg.head_dim == D
        assert Hkv == (cfg.n_kv_head or H)  # GQA keeps its shared key/value heads
        assert block.attn.c_attn.weight.shape == ((H + 2 * Hkv) * D, cfg.n_embd)
        assert block.attn.c_proj.weight.shape == (cfg.n_embd, H * D)
        n = len(sel.neurons[i])
        width = 2 * n if cfg.mlp == "swiglu" else n
        assert block.mlp.c_fc.weight.shape == (width, cfg.n_embd)
        assert block.mlp.c_proj.weight.shape == (cfg.n_embd, n)
    assert small.num_params() < model.num_params()
    assert (small.lm_head.weight is small.transformer.wte.weight) == cfg.tie_embeddings
    if uniform:
        assert (
            c.uniform and c.n_head == cfg.n_head // 2 and c.mlp_hidden == cfg.mlp_hidden_size // 2
        )
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], silenced(model, sel)(x)[0], rtol=0, atol=ATOL)


def test_selection_removes_the_lowest_scores() -> None:
    cfg = GPTConfig(**ARCHS["gpt2"])  # 2 layers x 4 heads, 128 neurons
    heads = [torch.tensor([0.4, 0.1, 0.3, 0.2]), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    neurons = [torch.arange(128.0), torch.arange(128.0) + 1000]
    sc = Scores(heads, neurons)
    sel = pruning.select(cfg, sc, 0.5)  # per layer: the two lowest heads, 64 lowest neurons
    assert sel.heads == [[0, 2], [2, 3]] and sel.neurons == [list(range(64, 128))] * 2
    glob = pruning.select(cfg, sc, 0.5, uniform=False)  # over all layers: layer 0 pays
    assert glob.heads == [[0], [1, 2, 3]]  # 4 of 8 go, layer 0 keeps one
    assert glob.neurons == [[127], list(range(1, 128))]  # 128 of 256 go, layer 0 keeps one
    assert pruning.select(cfg, sc, 0.25, heads=3).heads == [[0], [3]]
    # GQA (2 groups of 2 query heads): one head from every group per unit.
    gqa = GPTConfig(**ARCHS["llama-gqa"])
    sc = Scores([torch.tensor([0.9, 0.1, 0.2, 0.8])] * 2, [torch.arange(48.0)] * 2)
    assert pruning.select(gqa, sc, 0.5).heads == [[0, 3], [0, 3]]


def test_importance_finds_units_that_do_nothing() -> None:
    """A head or neuron whose output projection is zero cannot change the loss: its Taylor
    score is exactly zero, and every live unit scores above it."""
    model = make("llama-mha")
    D = model.cfg.head_dim
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[:, 2 * D : 3 * D] = 0
        model.transformer.h[0].mlp.c_proj.weight[:, 5] = 0
    batches = [(ids(2, 24, s), ids(2, 24, s + 100)) for s in range(3)]
    sc = pruning.importance(model, batches)
    assert sc.batches == 3 and sc.tokens == 3 * 2 * 24
    assert sc.heads[1][2] == 0 and sc.neurons[0][5] == 0
    assert (torch.cat(sc.heads) > 0).sum() == 2 * 4 - 1
    assert (torch.cat(sc.neurons) > 0).sum() == 2 * 48 - 1
    assert all(p.requires_grad for p in model.parameters())  # left as it was found
    sel = pruning.select(model.cfg, sc, 0.25)
    assert 2 not in sel.heads[1] and 5 not in sel.neurons[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(fraction=1.0), r"must be in \(0, 1\)"),
        (dict(fraction=0.0), r"must be in \(0, 1\)"),
        (dict(fraction=0.5, heads=4), "has 4 heads per layer and at least one must stay"),
        (dict(fraction=0.95), "would remove all 4 heads of layer 0"),
        (dict(fraction=0.001), "removes nothing"),
    ],
)
def test_bad_requests(kwargs: dict, match: str) -> None:
    model = make("gpt2")
    with pytest.raises(PruneError, match=match):
        pruning.select(model.cfg, scores_for(model), **kwargs)


def test_gqa_heads_go_one_per_group() -> None:
    model = make("llama-gqa")
    with pytest.raises(PruneError, match="remove a multiple of 2"):
        pruning.select(model.cfg, scores_for(model), 0.5, heads=1)


# ---- keeping zeros ---------------------------------------------------------------------------


def test_keep_zeros_holds_pruned_weights_through_adamw() -> None:
    model = make("llama-gqa")
    pruning.prune_unstructured(model, 0.5)
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    trained = make("llama-gqa", seed=3)  # other weights: the mask comes from `pruned`
    trained.load_state_dict(pruned)
    keys = trained.state_dict().keys()
    masked = pruning.keep_zeros(trained, pruned)
    assert masked == pruning.zeros_in_blocks(model)
    assert trained.state_dict().keys() == keys  # the mask is not a checkpoint entry
    assert all(type(m) is pruning.MaskedLinear for _, m in pruning.block_matmuls(trained))
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    trained.train()
    opt = build_optimizer(trained, OptimConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    for s in range(5):
        logits, _ = trained(ids(2, 24, s))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids(2, 24, s + 50).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, m in pruning.block_matmuls(trained):
        zero = pruned[n + ".weight"] == 0
        assert torch.equal(m.weight[zero], torch.zeros(int(zero.sum()))), n
        assert not torch.equal(m.weight[~zero], pruned[n + ".weight"][~zero]), n  # it trained
    # A dense source masks nothing and changes nothing.
    dense = make("gpt2")
    assert pruning.keep_zeros(dense, dense.state_dict()) == 0
    assert all(type(m) is torch.nn.Linear for _, m in pruning.block_matmuls(dense))
    assert math.isfinite(float(loss.detach()))
