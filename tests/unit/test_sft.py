"""Fine-tuning data: the loader turns the shards' loss masks into ignored targets (-1), the prompt
contributes no gradient, and packing, exact and elastic resume are those of plain data."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.data import Source, TokenLoader, read_manifest
from pretrain.model import GPT, GPTConfig
from tests.data_fixtures import global_stream

L, B, P = 32, 4, 12


def _batches(loader: TokenLoader, n: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in itertools.islice(loader, n)))
    return np.concatenate(xs), np.concatenate(ys)


def test_targets_are_ignored_exactly_where_the_target_is_a_prompt_token(sft_data: Path) -> None:
    m = read_manifest(sft_data)
    assert m.loss_mask
    x, y = _batches(TokenLoader(sft_data, "train", L, B, partitions=P, seed=3), 60)
    windows, _ = global_stream(sft_data, "train", 3, 0, L, P)
    masks, _ = global_stream(sft_data, "train", 3, 0, L, P, masks=True)
    n = len(x)
    assert np.array_equal(x, windows[:n, :-1])
    expected_y = np.where(masks[:n, 1:] == 1, windows[:n, 1:].astype(np.int64), -1)
    assert np.array_equal(y, expected_y)
    # Both kinds are there: response targets and ignored prompt targets.
    assert 0.02 < (y == -1).mean() < 0.5


def test_prompt_tokens_contribute_no_gradient(sft_data: Path) -> None:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_embd=32, block_size=L, dropout=0.0)
    )
    x, y = next(iter(TokenLoader(sft_data, "train", L, 16, partitions=P, seed=1)))
    ignored = y == -1
    assert ignored.any() and (~ignored).any()
    # The loss is computed from the final hidden states (the input of lm_head), a chunk of
    # positions at a time: its gradient there is exactly zero at a prompt target.
    hidden: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0].retain_grad()
        hidden.append(args[0])

    handle = model.lm_head.register_forward_pre_hook(keep)
    _, loss = model(x, y)
    handle.remove()
    loss.backward()
    g = hidden[0].grad
    assert g is not None
    assert torch.equal(g[ignored], torch.zeros_like(g[ignored]))
    assert (g[~ignored].abs().sum(-1) > 0).all()
    # And the parameters' gradient is that of the mean loss over the response targets alone.
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits2, _ = model(x)
    F.cross_entropy(logits2[~ignored], y[~ignored]).backward()
    for k, p in model.named_parameters():
        if k in grads:
            # fp32: the same terms, summed in another order (a mean over <= 512 targets, then
            # matmul reductions over 32-512 terms): ~1e-6 relative; 1e-5 is an ample bound.
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-7)


def _interleave(per_rank: list[np.ndarray]) -> np.ndarray:
    R, n = len(per_rank), min(len(p) for p in per_rank)
    out = np.empty((n * R, *per_rank[0].shape[1:]), per_rank[0].dtype)
    for r, p in enumerate(per_rank):
        out[r::R] = p[:n]
    return out


def test_exact_and_elastic_resume_keep_the_masks(sft_data: Path) -> None:
    ref_x, ref_y = _batches(TokenLoader(sft_data, "train", L, B, partitions=P, seed=2), 60)
    # 2 ranks x 2 workers read 10 batches each, then 1 rank (3 workers) and 4 ranks go on.
    two = [
        TokenLoader(
            sft_data, "train", L, B, rank=r, world_size=2, num_workers=2, partitions=P, seed=2
        )
        for r in range(2)
    ]
    heads = [_batches(ld, 10) for ld in two]
    states = [ld.state_dict() for ld in two]
    head_y = _interleave([h[1] for h in heads])
    assert np.array_equal(head_y, ref_y[: len(head_y)])
    again = TokenLoader(
        sft_data, "train", L, B, rank=0, world_size=2, num_workers=2, partitions=P, seed=2
    )
    again.load_state_dict(states)
    exact = TokenLoader(
        sft_data, "train", L, B, rank=0, world_size=2, num_workers=2, partitions=P, seed=2
    )
    _batches(exact, 10)
    assert np.array_equal(_batches(again, 5)[1], _batches(exact, 5)[1])
    for world, workers in ((1, 3), (4, 1)):
        new = []
        for r in range(world):
            ld = TokenLoader(sft_data, "train", L, B, rank=r, world_size=world,
                             num_workers=workers, partitions=P, seed=2)  # fmt: skip
            ld.load_state_dict(states)
            new.append(_batches(ld, 6))
        tail_x, tail_y = _interleave([t[0] for t in new]), _interleave([t[1] for t in new])
        start = len(head_y)
        assert np.array_equal(tail_x, ref_x[start : start + len(tail_x)])
        assert np.array_equal(tail_y, ref_y[start : start + len(tail_y)])


def test_a_fine_tuning_source_keeps_its_masks_inside_a_mixture(
    tiny_data: Path, sft_data: Path
) -> None:
    sources = [Source("web", read_manifest(tiny_data), 0.6), Source("sft", read_manifest(sft_data), 0.4)]  # fmt: skip
    loader = TokenLoader(sources, "train", L, B, partitions=P, seed=3, num_workers=2)
    x, y = _batches(loader, 100)
    # Each window's source and place in it, checked against both sources' own streams.
    k, n = loader._mixture.take(np.arange(len(x)))
    epochs = int(n[k == 1].max()) // (len(global_stream(sft_data, "train", 3, 0, L, P)[0])) + 1
    streams = {
        d: [
            np.concatenate(
                [global_stream(d, "train", 3, e, L, P, masks=m)[0] for e in range(epochs)]
            )
            for m in (False, True)
        ]  # fmt: skip
        for d in (tiny_data, sft_data)
    }
    for src, data in enumerate((tiny_data, sft_data)):
        sel = k == src
        windows, masks = streams[data]
        w, mk = windows[n[sel]], masks[n[sel]]
        assert np.array_equal(x[sel], w[:, :-1])
        assert np.array_equal(y[sel], np.where(mk[:, 1:] == 1, w[:, 1:].astype(np.int64), -1))
    # The fine-tuning windows ignore their prompt targets; the plain windows ignore none.
    assert (y[k == 0] != -1).all() and 0.02 < (y[k == 1] == -1).mean() < 0.5
