"""`pretrain.export`: consolidated safetensors from a checkpoint, tied weights stored once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from pretrain import checkpoint
from pretrain.export import export_safetensors, load_safetensors, main
from pretrain.model import GPT, GPTConfig

CFG = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GPT]:
    """A real checkpoint (pretrain.checkpoint.save) of a GPT that took one AdamW step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 61, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    root = tmp_path_factory.mktemp("export") / "checkpoints"
    path = checkpoint.save(root, 1, state, {"step": 1}, {"model": CFG}, keep_last=1)
    return path, model


def test_round_trip_is_exact_and_loads_strictly(ckpt: tuple[Path, GPT], tmp_path: Path) -> None:
    path, model = ckpt
    out = export_safetensors(path, tmp_path / "model.safetensors")
    weights = load_safetensors(out)
    assert weights.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    with safe_open(str(out), "pt") as f:
        stored = set(f.keys())
        meta = f.metadata()
    # The tied output projection is an alias, not a second copy.
    assert json.loads(meta["tied"]) == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in stored
    restored = GPT(GPTConfig(**json.loads(meta["model"])))
    restored.load_state_dict(weights, strict=True)
    x = torch.randint(0, 61, (1, 8))
    assert torch.equal(restored(x)[0], model(x)[0])


def test_run_directory_and_dtype(ckpt: tuple[Path, GPT], tmp_path: Path) -> None:
    path, model = ckpt
    out = export_safetensors(path.parent.parent, tmp_path / "bf16.safetensors", dtype="bf16")
    weights = load_safetensors(out)
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    ref = model.state_dict()["transformer.wte.weight"].to(torch.bfloat16)
    assert torch.equal(weights["transformer.wte.weight"], ref)


def test_cli(ckpt: tuple[Path, GPT], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = ckpt
    assert main([str(path), str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m.safetensors").is_file()
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x.safetensors")]) == 1
    assert "neither a complete checkpoint nor a run directory" in capsys.readouterr().err
    # An existing file is replaced only when asked.
    assert main([str(path), str(tmp_path / "m.safetensors")]) == 1
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert main([str(path), str(tmp_path / "m.safetensors"), "--overwrite"]) == 0


def test_hf_format_refusals(
    ckpt: tuple[Path, GPT], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format hf: a checkpoint without a tokenizer, a file target, a model no stock class
    fits: one line each, nothing written."""
    path, _ = ckpt
    assert main([str(path), str(tmp_path / "hf"), "--format", "hf"]) == 1
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "copy the tokenizer" in err
    assert main([str(path), str(tmp_path / "m.safetensors"), "--format", "hf"]) == 1
    assert "writes a directory" in capsys.readouterr().err
    mixed = dict(CFG, pos_emb="rope", norm="layernorm")
    model = GPT(GPTConfig(**mixed))
    state = {"model": get_model_state_dict(model)}
    root = tmp_path / "mixed" / "checkpoints"
    saved = checkpoint.save(root, 1, state, {"step": 1}, {"model": mixed}, keep_last=1)
    assert main([str(saved), str(tmp_path / "hf2")]) == 1  # a directory target means hf
    err = capsys.readouterr().err
    assert "fits no stock transformers class" in err and "pos_emb=rope" in err
    assert ".safetensors" in err  # what to do instead
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf2").exists()
