"""A fine-tune of an unstructured-pruned model keeps its zeros under the strategies that hold
the weights elsewhere than in the module: FSDP2 (sharded DTensor parameters, updated shard by
shard) and DeepSpeed ZeRO-3 (partitioned parameters, an fp32 master copy the optimizer steps),
2 real ranks each, and DDP. The masked forward (pretrain.pruning.keep_zeros) is what they all
share; no strategy code knows about it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain import checkpoint, pruning
from pretrain.compressed import write_compressed
from pretrain.model import GPT, GPTConfig
from tests.conftest import torchrun
from tests.distributed.test_init_from import cli
from tests.distributed.test_strategies import env

DEBUG = dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture(scope="module")
def sparse_source(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The debug model, half of its block weights pruned by magnitude, as pretrain.compress
    writes it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**DEBUG))
    info = {"prune": pruning.prune_unstructured(model, 0.5), "source": {}, "data": str(tiny_data)}
    out = tmp_path_factory.mktemp("sparse") / "u50"
    return write_compressed(out, model, info, [tiny_data / "tokenizer.model"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_pruned_weights_stay_zero(
    strategy: str, sparse_source: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from pretrain.pretrained import load_pretrained

    before = {n: m.weight.detach().clone() for n, m in
              pruning.block_matmuls(load_pretrained(sparse_source).model)}  # fmt: skip
    run = tmp_path / strategy
    proc = torchrun(2, cli(tiny_data, run, f"strategy={strategy}", "train.max_steps=3",
                           f"train.init_from={sparse_source}", "optim.lr=1e-2"),
                    env=env(), timeout=600)  # fmt: skip
    zeros = sum(int((w == 0).sum()) for w in before.values())
    assert f"{zeros:,} pruned weights kept at zero" in proc.stdout
    if strategy == "zero3":
        assert "FSDP equivalent" not in proc.stdout  # DeepSpeed ran
    after = checkpoint.load_model_weights(run)
    for n, w in before.items():
        mask = w == 0
        assert torch.equal(after[n + ".weight"][mask], torch.zeros(int(mask.sum()))), n
        assert not torch.equal(after[n + ".weight"][~mask], w[~mask]), n  # it trained
