"""A prepared split, scored document by document: loss, perplexity, bits per byte.

Each document is scored on its own, conditioned on EOS (every document in the training stream
follows one): the sequence EOS + document (the document ends with the EOS prepare appended, so
the end of a document is predicted too) is cut into disjoint windows of `seq_len` predictions
(default block_size), each window seeing only its own tokens, which is lm_eval's rolling
log-likelihood (context_len=1). So the result does not depend on the batch size or on the order
of documents, and every token of the split is predicted exactly once: `tokens` is the split's
token count. Bits per byte = total NLL / ln 2 / the UTF-8 bytes of the documents' text (decoded
with the data's tokenizer, whatever its kind, special tokens dropped; exact for our
sentencepiece tokenizer on any text without U+2581, its space marker, and for byte-level BPE
tokenizers without a normaliser), so models with different tokenizers compare.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from pretrain.config import ConfigError
from pretrain.data.shards import DataError, Manifest, data_tokenizer, read_shard
from pretrain.evaluation.loss import model_loss, total_nll
from pretrain.model import GPT

Window = tuple[np.ndarray, np.ndarray]  # (inputs [n], targets [n]) token ids


def windows(doc: np.ndarray, eos_id: int, seq_len: int) -> list[Window]:
    """(inputs, targets) windows that predict every token of `doc` once, conditioned on EOS.

    doc: [n] token ids (ending in EOS). The stream EOS + doc is cut into disjoint chunks of up to
    seq_len targets; each chunk's inputs are the tokens right before its targets."""
    n = len(doc)
    stream = np.concatenate([[eos_id], doc]).astype(np.int64)  # [n + 1]
    return [
        (stream[s : min(s + seq_len, n)], stream[s + 1 : s + 1 + seq_len])
        for s in range(0, n, seq_len)
    ]


def padded_batches(
    wins: list[Window], batch_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`wins` batched by length (longest first) into batches of about `batch_tokens` tokens,
    right-padded: x [B, T] pads with 0, y [B, T] with -1 (ignored). Causal attention keeps the
    padding out of the real positions."""
    order = sorted(range(len(wins)), key=lambda i: -len(wins[i][0]))
    out = []
    i = 0
    while i < len(order):
        longest = len(wins[order[i]][0])
        rows = max(1, batch_tokens // longest)
        batch = [wins[j] for j in order[i : i + rows]]
        i += rows
        x = torch.zeros(len(batch), longest, dtype=torch.long)
        y = torch.full((len(batch), longest), -1, dtype=torch.long)
        for r, (inp, tgt) in enumerate(batch):
            x[r, : len(inp)] = torch.from_numpy(inp)
            y[r, : len(tgt)] = torch.from_numpy(tgt)
        out.append((x, y))
    return out


def score_windows(
    model: torch.nn.Module,
    wins: list[Window],
    batch_tokens: int,
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """Total NLL (nats) of the targets of `wins`."""
    nll, _ = total_nll(
        model_loss(model, device, precision), padded_batches(wins, batch_tokens), device
    )
    return float(nll.item())


def evaluate_split(
    model: GPT,
    manifest: Manifest,
    split: str = "val",
    *,
    seq_len: int = 0,
    max_documents: int = 0,
    batch_tokens: int = 16384,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    allow_pipe: bool = False,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of `model` on `split` (see the module docstring)."""
    device = torch.device(device)
    block = model.cfg.block_size
    seq_len = seq_len or block
    if not 0 < seq_len <= block:
        raise ConfigError(f"seq_len={seq_len} must be in [1, block_size={block}] (0 = block_size)")
    tok = data_tokenizer(manifest, allow_pipe=allow_pipe)
    nll, tokens, n_bytes, n_docs, elapsed = 0.0, 0, 0, 0, 0.0
    # Shard by shard: memory holds one shard's windows, however large the split.
    for shard in manifest.shards(split):
        docs = [tokens for tokens, _ in read_shard(manifest, shard, allow_pipe=allow_pipe)]
        if max_documents:
            docs = docs[: max_documents - n_docs]
        n_bytes += sum(len(tok.decode(d).encode("utf-8")) for d in docs)
        wins = [w for d in docs for w in windows(d, manifest.eos_id, seq_len)]
        start = time.perf_counter()
        nll += score_windows(model, wins, batch_tokens, device, precision)
        elapsed += time.perf_counter() - start
        tokens += sum(len(d) for d in docs)
        n_docs += len(docs)
        if n_docs == max_documents:
            break
    if not n_docs:
        raise DataError(f"split {split!r} of {manifest.source} has no documents to evaluate")
    loss = nll / tokens
    return {
        "split": split,
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": n_docs,
        "seq_len": seq_len,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
    }
