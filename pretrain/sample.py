"""`python -m pretrain.sample checkpoint=<run dir | checkpoint | HF dir> prompt="..."`: print text.

Loads the weights from any checkpoint (any strategy, any world size) or Hugging Face directory
into one process (`pretrain.pretrained.load_pretrained`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore

from pretrain.model import GPT
from pretrain.pretrained import SourceError, load_pretrained
from pretrain.tokenizer import TextTokenizer


@dataclass
class SampleConfig:
    checkpoint: str = "runs/demo"
    """A run directory (its newest checkpoint), <run dir>/best, a checkpoints/step_* dir, a
    Hugging Face model directory or a compressed model directory."""
    prompt: str = ""
    """Text to continue (empty = start a new document: after EOS). It is the start of a
    document: the tokenizer's BOS comes first where prepared data has one."""
    num_samples: int = 2
    """How many continuations to print."""
    max_new_tokens: int = 200
    """Tokens to generate per sample."""
    temperature: float = 0.8
    """Softmax temperature (0 = greedy)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 0.95
    """Nucleus sampling: keep the smallest set with this much probability (1.0 = off)."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """auto (cuda if available), cuda or cpu."""


ConfigStore.instance().store(name="sample", node=SampleConfig)


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, TextTokenizer]:
    loaded = load_pretrained(path, device)
    if loaded.tokenizer is None:
        raise SourceError(f"{loaded.path} has no tokenizer: sampling needs one")
    return loaded.model, loaded.tokenizer


def check(cfg: SampleConfig) -> None:
    """One line (SourceError) for a value that generation cannot take."""
    for key, value, ok, want in (
        ("num_samples", cfg.num_samples, cfg.num_samples >= 1, "at least 1"),
        ("max_new_tokens", cfg.max_new_tokens, cfg.max_new_tokens >= 1, "at least 1"),
        ("temperature", cfg.temperature, cfg.temperature >= 0, ">= 0 (0 = greedy)"),
        ("top_k", cfg.top_k, cfg.top_k >= 0, ">= 0 (0 = off)"),
        ("top_p", cfg.top_p, 0 < cfg.top_p <= 1, "in (0, 1] (1 = off)"),
        ("device", cfg.device, cfg.device in ("auto", "cuda", "cpu"), "auto, cuda or cpu"),
    ):
        if not ok:
            raise SourceError(f"{key}={value!r}: must be {want}")


def sample(cfg: SampleConfig) -> list[str]:
    check(cfg)
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    model, tok = load_model(cfg.checkpoint, device)
    # Every document in the training data follows an EOS and starts with the tokenizer's BOS
    # where it adds one: a prompt is a document's start; no prompt starts after EOS.
    head, _ = tok.document_ends()
    start = head + tok.encode(cfg.prompt) if cfg.prompt else [tok.eos_id, *head]
    idx = torch.tensor([start] * cfg.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(
        idx,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        top_p=cfg.top_p if cfg.top_p < 1.0 else None,
        eos_id=tok.eos_id,
        generator=gen,
    )
    texts = []
    for row in out.tolist():
        ids = [t for t in row if t != tok.eos_id] if not cfg.prompt else row
        texts.append(tok.decode([t for t in ids if t != tok.eos_id]))
    return texts


@hydra.main(config_path=None, config_name="sample", version_base=None)
def main(cfg: SampleConfig) -> None:
    try:
        texts = sample(cfg)
    except SourceError as e:  # a bad value or path: one line, no traceback
        sys.exit(f"sample: error: {e}")
    for i, text in enumerate(texts):
        print(f"----- sample {i} -----\n{text}\n", flush=True)


if __name__ == "__main__":
    main()
