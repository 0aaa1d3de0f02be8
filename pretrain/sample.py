"""`python -m pretrain.sample checkpoint=<run dir or checkpoint dir> prompt="..."`: print text.

Loads the weights from any checkpoint (any strategy, any world size) into one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore

from pretrain import checkpoint
from pretrain.model import GPT, GPTConfig
from pretrain.tokenizer import Tokenizer


@dataclass
class SampleConfig:
    checkpoint: str = "runs/demo"
    """A run directory (its newest checkpoint), <run dir>/best, or a checkpoints/step_* dir."""
    prompt: str = ""
    """Text to continue (empty = start from BOS/EOS)."""
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


def find_tokenizer(ckpt: Path) -> Path:
    # checkpoints/step_N -> the run directory holds tokenizer.model
    for cand in (ckpt / "tokenizer.model", ckpt.parent.parent / "tokenizer.model"):
        if cand.is_file():
            return cand
    cfg = checkpoint.read_config(ckpt)
    manifest_tok = Path(cfg["data"]["dir"]) / "tokenizer.model"
    if manifest_tok.is_file():
        return manifest_tok
    raise FileNotFoundError(f"no tokenizer.model next to {ckpt} or in its data directory")


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.read_config(ckpt)
    model = GPT(GPTConfig(**cfg["model"]))
    model.load_state_dict(checkpoint.load_model_weights(ckpt))
    return model.to(device).eval(), Tokenizer(find_tokenizer(ckpt))


def sample(cfg: SampleConfig) -> list[str]:
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    model, tok = load_model(cfg.checkpoint, device)
    start = (
        tok.encode(cfg.prompt) if cfg.prompt else [tok.bos_id if tok.bos_id >= 0 else tok.eos_id]
    )
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
    for i, text in enumerate(sample(cfg)):
        print(f"----- sample {i} -----\n{text}\n", flush=True)


if __name__ == "__main__":
    main()
