"""int8 quantisation of a GPT with torchao, and the weight file that stores it.

    int8           weight-only: every weight matrix stored as int8 with one fp32 scale per output
                   row (torchao `Int8WeightOnlyConfig`, PerRow); activations stay fp32 and each
                   matmul runs on the dequantised weight.
    int8-dynamic   int8 weights as above and int8 activations, quantised per token at run time
                   (torchao `Int8DynamicActivationInt8WeightConfig`): the block matmuls and the
                   output layer run as int8 x int8 -> int32 matmuls (`torch._int_mm`).

What is quantised: every matmul of the blocks (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj),
the output layer (lm_head) and the token embedding. A tied embedding is one [V, C] matrix used
both ways; its rows are the output layer's output channels, so one per-row quantisation serves
both: lm_head is quantised and the embedding is re-tied to the same int8 tensor, stored once
(torchao's embedding op dequantises it for the lookup). An untied embedding is quantised on its
own, weight-only (a lookup has no activation to quantise). Norms, biases and the learned
position table stay fp32: they are a small part of the file and each feeds every token.

On CPUs without AVX512-VNNI, int8-dynamic uses torchao's reduced range (7-bit activations and
weights) so that the u8 x s8 multiply-adds cannot saturate; the choice is recorded.

The file: one safetensors file (`save_weights`), each quantised tensor flattened by torchao into
plain tensors (`_weight_qdata` int8, `_weight_scale` fp32, `_weight_zero_point`) described by
JSON metadata; `load_weights` rebuilds them through torchao's allow-list of tensor classes, so
nothing is unpickled. A tied weight is stored once (metadata `tied`, as in `pretrain.export`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pretrain.model import GPT

Method = Literal["int8", "int8-dynamic"]
METHODS: tuple[Method, ...] = ("int8", "int8-dynamic")
BLOCK_MATMULS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _torchao() -> Any:
    """Import torchao with its start-up notices (CUDA-only kernels it cannot load on a CPU
    machine) silenced."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization

        return torchao
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def is_quantized(t: torch.Tensor) -> bool:
    """Whether `t` is one of torchao's quantised tensor subclasses."""
    return type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "qdata")


def model_is_quantized(model: nn.Module) -> bool:
    return any(is_quantized(p) for p in model.parameters())


def reduce_range_here() -> bool:
    """torchao's answer for this host: reduce the int8 range when the CPU has no VNNI."""
    from torchao.utils import should_reduce_range

    _torchao()
    return bool(should_reduce_range(torch.device("cpu")))


def quantize_model(model: GPT, method: str, *, reduce_range: bool | None = None) -> dict[str, Any]:
    """Quantise `model` in place (see the module docstring); returns what was done, for the
    model's manifest: method, reduce_range, the quantised tensor names."""
    if method not in METHODS:
        raise ValueError(f"--quantize {method}: choose one of {', '.join(METHODS)}")
    if model_is_quantized(model):
        raise ValueError("the model is already quantised")
    _torchao()
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if reduce_range is None:
        reduce_range = method == "int8-dynamic" and reduce_range_here()
    # set_inductor_config=False: these are eager models; torchao would otherwise change
    # torch.compile's global settings for the whole process.
    weight_only = Int8WeightOnlyConfig(set_inductor_config=False)
    cfg: Any = weight_only
    if method == "int8-dynamic":
        cfg = Int8DynamicActivationInt8WeightConfig(
            set_inductor_config=False, reduce_range=reduce_range
        )
    tied = model.cfg.tie_embeddings

    def matmul(mod: nn.Module, fqn: str) -> bool:
        return isinstance(mod, nn.Linear) and (fqn.endswith(BLOCK_MATMULS) or fqn == "lm_head")

    quantize_(model, cfg, filter_fn=matmul)
    if tied:
        # One int8 matrix for both uses: the embedding looks its rows up.
        model.transformer.wte.weight = model.lm_head.weight
    else:
        quantize_(model, weight_only, filter_fn=lambda m, fqn: fqn == "transformer.wte")
    names = [n for n, t in model.state_dict().items() if is_quantized(t)]
    return {"method": method, "reduce_range": bool(reduce_range), "tensors": len(names)}


def dequantized(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with every quantised tensor replaced by its fp32 value (aliases kept as aliases):
    what a training run starts from (`train.init_from` of a quantised model)."""
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for k, t in sd.items():
        if is_quantized(t):
            key = t.qdata.untyped_storage().data_ptr()  # type: ignore[attr-defined]
            if key not in done:
                done[key] = t.dequantize().to(torch.float32)  # type: ignore[attr-defined]
            out[k] = done[key]
        else:
            out[k] = t
    return out


# ---------------------------------------------------------------------------------------------
# The weight file
# ---------------------------------------------------------------------------------------------


def _aliases(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the tensors stored once, {alias: stored name}): a tied weight is one storage (of a
    plain tensor, or of a quantised tensor's int8 values) under two names."""
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[Any, str] = {}
    for name, t in sd.items():
        data = t.qdata if is_quantized(t) else t  # type: ignore[attr-defined]
        key = (is_quantized(t), data.untyped_storage().data_ptr(), tuple(t.shape))
        if key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        stored[name] = t
    return stored, tied


def save_weights(
    sd: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write state dict `sd` (plain and quantised tensors) to the safetensors file `path`."""
    from safetensors.torch import save_file

    _torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    stored, tied = _aliases(sd)
    plain = {
        k: (v if is_quantized(v) else v.detach().contiguous().clone()) for k, v in stored.items()
    }
    tensors, meta = flatten_tensor_state_dict(plain)
    meta = {**meta, **(metadata or {}), "tied": json.dumps(tied)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict `save_weights` wrote, quantised tensors rebuilt, aliases restored."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    _torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    sd, leftover = unflatten_tensor_state_dict(load_file(str(path)), meta)
    if leftover:
        raise ValueError(f"{path} holds tensors its metadata does not describe: {sorted(leftover)}")
    for alias, name in json.loads(meta.get("tied", "{}")).items():
        sd[alias] = sd[name]
    return sd


def load_into(model: GPT, sd: dict[str, torch.Tensor]) -> GPT:
    """Load `sd` (from `load_weights`) into `model`, a GPT of the same config (built on any
    device, e.g. meta): parameters are replaced by the stored tensors, quantised ones included,
    and a tied embedding is tied again."""
    model.load_state_dict(sd, assign=True, strict=True)
    for p in model.parameters():
        if is_quantized(p):
            p.requires_grad_(False)
    if model.cfg.tie_embeddings:
        model.transformer.wte.weight = model.lm_head.weight
    return model
