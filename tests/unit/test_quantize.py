"""int8 quantisation: what is quantised, the weight file (int8 on disk, a tied matrix once, no
pickle), loading it back, and the fp32 weights a training run starts from."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from pretrain import quantize
from pretrain.model import GPT, GPTConfig
from pretrain.pretrained import Pretrained, weights_for

GPT2 = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)
LLAMA = dict(
    vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
    norm="rmsnorm", mlp="swiglu", pos_emb="rope", tie_embeddings=False,
)  # fmt: skip
ARCHS = {"gpt2": GPT2, "llama": LLAMA}


def make(arch: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**ARCHS[arch])).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", quantize.METHODS)
def test_what_is_quantised_and_how_it_is_stored(arch: str, method: str, tmp_path: Path) -> None:
    model = make(arch)
    fp32_numel = {k: v.numel() for k, v in model.state_dict().items()}
    info = quantize.quantize_model(model, method)
    sd = model.state_dict()
    int8 = sorted(k for k, v in sd.items() if quantize.is_quantized(v))
    matmuls = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in quantize.BLOCK_MATMULS]
    assert int8 == sorted([*matmuls, "lm_head.weight", "transformer.wte.weight"])
    tied = model.cfg.tie_embeddings
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert info["tensors"] == len(int8)

    path = quantize.save_weights(sd, tmp_path / "w.safetensors")
    entries = {k: v for k, v in header(path).items() if k != "__metadata__"}
    # Every quantised matrix is stored as int8 values of its shape, one fp32 scale and one
    # int8 zero point per row; everything else as fp32. Nothing else is in the file, and a
    # tied matrix is there once.
    stored = [k for k in int8 if not (tied and k == "lm_head.weight")]
    expected: dict[str, tuple[str, int]] = {}
    for k in stored:
        mod, name = k.rsplit(".", 1)
        rows = sd[k].shape[0]
        expected[f"{mod}._{name}_qdata"] = ("I8", fp32_numel[k])
        expected[f"{mod}._{name}_scale"] = ("F32", rows)
        expected[f"{mod}._{name}_zero_point"] = ("I8", rows)
    for k, n in fp32_numel.items():
        if k not in int8:
            expected[k] = ("F32", n)
    got = {k: (v["dtype"], int(torch.tensor(v["shape"]).prod())) for k, v in entries.items()}
    assert got == expected
    payload = max(v["data_offsets"][1] for v in entries.values())
    size = {"I8": 1, "F32": 4}
    assert payload == sum(size[d] * n for d, n in expected.values())
    assert json.loads(header(path)["__metadata__"]["tied"]) == (
        {"lm_head.weight": "transformer.wte.weight"} if tied else {}
    )

    # Loaded back into a model built on the meta device: the same int8 tensors, the same
    # logits bit for bit (the same int8 arithmetic), tied again.
    with torch.device("meta"):
        again = GPT(model.cfg)
    quantize.load_into(again, quantize.load_weights(path))
    assert (again.lm_head.weight is again.transformer.wte.weight) == tied
    for k, v in again.state_dict().items():
        if quantize.is_quantized(v):
            assert torch.equal(v.qdata, sd[k].qdata) and torch.equal(v.scale, sd[k].scale)
    x = ids()
    with torch.no_grad():
        assert torch.equal(again(x)[0], model(x)[0])


def test_a_file_naming_another_class_is_refused(tmp_path: Path) -> None:
    """The loader builds only torchao's allow-listed tensor classes from JSON: a file that
    names anything else (here: a function) is refused, never imported or unpickled."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = make("gpt2")
    quantize.quantize_model(model, "int8")
    path = quantize.save_weights(model.state_dict(), tmp_path / "w.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    key = "transformer.h.0.attn.c_attn.weight"
    entry = json.loads(meta[key])
    entry["_type"] = "os.system"
    meta[key] = json.dumps(entry)
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="Unsupported tensor type: os.system"):
        quantize.load_weights(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_training_run_starts_from_the_dequantised_weights(arch: str) -> None:
    model = make(arch)
    quantize.quantize_model(model, "int8-dynamic")
    p = Pretrained("compressed", Path("."), model.cfg, model, None)
    sd = weights_for(p, model.cfg)
    for k, v in sd.items():
        assert type(v) is torch.Tensor and v.dtype == torch.float32, k
        q = model.state_dict()[k]
        want = q.dequantize() if quantize.is_quantized(q) else q
        assert torch.equal(v, want), k
    dense = GPT(model.cfg)
    dense.load_state_dict(sd)
    assert (sd["lm_head.weight"] is sd["transformer.wte.weight"]) == model.cfg.tie_embeddings


def test_quantising_twice_is_refused() -> None:
    model = make("gpt2")
    quantize.quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantised"):
        quantize.quantize_model(model, "int8")
    with pytest.raises(ValueError, match="choose one of int8, int8-dynamic"):
        quantize.quantize_model(make("gpt2"), "int4")


@pytest.mark.parametrize("reduce_range", [False, True])
def test_dynamic_int8_either_range_stays_close(reduce_range: bool) -> None:
    """Both answers to "does this CPU have VNNI" (forced): the reduced 7-bit range costs
    precision, never correctness. Per-row int8 of N(0, 0.02) weights and per-token int8
    activations: each of the <= 128-term dot products is off by a few quantisation steps
    (~1% of its scale, twice that at 7 bits), so logits of O(1) stay within 0.1."""
    model = make("llama")
    x = ids()
    with torch.no_grad():
        ref = model(x)[0][..., :61]
    info = quantize.quantize_model(model, "int8-dynamic", reduce_range=reduce_range)
    assert info["reduce_range"] is reduce_range
    with torch.no_grad():
        out = model(x)[0][..., :61]
    assert (out - ref).abs().max() < 0.1
    assert not torch.equal(out, ref)
