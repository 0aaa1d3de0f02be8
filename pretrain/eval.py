"""`python -m pretrain.eval checkpoint=<run dir | checkpoint | HF dir> data.dir=<prepared dir>`

Evaluates a trained model, loaded from any form it is stored in (`pretrain.pretrained`):

* on a split of a prepared data dir (`split=val` by default, the whole split unless
  `max_documents` says otherwise): loss (mean NLL per token, nats), perplexity, bits per byte
  and the tokens evaluated (how: `pretrain/evaluation/split.py`);
* on downstream tasks through lm-evaluation-harness (`tasks=pyline`, or any task lm_eval knows:
  `tasks='hellaswag,arc_easy'` where the hub is reachable; `pretrain/evaluation/harness.py`).

The last line on stdout is one JSON object: `loss`, `ppl`, `bits_per_byte`, `tokens`, `bytes`,
`documents`, `tokens_per_s` (with a data dir) and `tasks` ({task: {metric: value}}).
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ConfigError, SourceConfig
from pretrain.data.shards import DataError, read_manifest
from pretrain.evaluation.harness import PretrainLM, run_tasks, task_metrics
from pretrain.evaluation.split import evaluate_split
from pretrain.pretrained import Pretrained, SourceError, check_tokenizer, load_pretrained

PRECISIONS = ("fp32", "bf16")  # fp16 has no loss scaling to keep an evaluation finite


@dataclass
class EvalDataConfig:
    dir: str = ""
    """Prepared data dir (holds manifest.json) whose split is scored; empty = tasks only."""
    mix: dict[str, SourceConfig] = field(default_factory=dict)
    """A mixture's sources {name: {dir, weight}}: each scored apart, and their mean weighted
    by the mixture (a training run's `data.mix`); instead of data.dir."""
    allow_pipe: bool = False
    """Allow a `pipe:` data dir (it runs shell commands)."""


@dataclass
class EvalConfig:
    checkpoint: str = ""
    """The model: a run directory, a checkpoints/step_* directory or a Hugging Face directory."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Where the scored text comes from."""
    split: str = "val"
    """Split of data.dir to score."""
    max_documents: int = 0
    """Score only the first N documents of the split (0 = the whole split)."""
    seq_len: int = 0
    """Predictions per window (0 = the model's block_size)."""
    batch_tokens: int = 16384
    """Tokens per forward pass (windows are batched up to this many)."""
    tasks: str = ""
    """lm-evaluation-harness tasks, comma-separated (e.g. pyline, or 'hellaswag,arc_easy')."""
    limit: int = 0
    """Documents per task (0 = all)."""
    num_fewshot: int = -1
    """Few-shot examples per task prompt (-1 = the task's default)."""
    batch_size: int = 16
    """Task requests per forward pass."""
    output: str = ""
    """Also write the result (and lm_eval's per-sample records) to this JSON file."""
    device: str = "auto"
    """auto (cuda if available), cuda or cpu."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast)."""


def evaluate(cfg: EvalConfig, log: Any = print) -> dict[str, Any]:
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint= is required: a run directory, a checkpoint or a Hugging Face directory"
        )
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if cfg.data.dir and cfg.data.mix:
        raise ConfigError("data.dir and data.mix both name the data: give one of them")
    if not cfg.data.dir and not cfg.data.mix and not names:
        raise ConfigError(
            "nothing to evaluate: give data.dir=<prepared dir> (loss, ppl, bits per byte) "
            "and/or tasks=<lm-eval task names>"
        )
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if cfg.precision not in PRECISIONS:  # refused before anything is loaded
        raise ConfigError(f"precision={cfg.precision!r}: choose fp32 or bf16")
    p: Pretrained = load_pretrained(cfg.checkpoint, device)
    result: dict[str, Any] = {"checkpoint": str(p.path), "kind": p.kind}
    log(f"eval: {p.describe()} | {p.model.num_params() / 1e6:.2f}M params | {device.type}")
    for name, src in cfg.data.mix.items():
        if not src.dir or not src.weight > 0:
            raise ConfigError(
                f"data.mix.{name}: give its prepared dir and a weight > 0 (got dir={src.dir!r}, "
                f"weight={src.weight})"
            )
    sources = {name: (src.dir, src.weight) for name, src in cfg.data.mix.items()}
    if cfg.data.dir:
        sources = {"": (cfg.data.dir, 1.0)}
    scored: dict[str, dict[str, Any]] = {}
    for name, (data_dir, _) in sources.items():
        manifest = read_manifest(data_dir, allow_pipe=cfg.data.allow_pipe)
        check_tokenizer(p, manifest, allow_pipe=cfg.data.allow_pipe)
        split = evaluate_split(
            p.model,
            manifest,
            cfg.split,
            seq_len=cfg.seq_len,
            max_documents=cfg.max_documents,
            batch_tokens=cfg.batch_tokens,
            device=device,
            precision=cfg.precision,
            allow_pipe=cfg.data.allow_pipe,
        )
        scored[name] = {**split, "data": str(data_dir)}
        log(
            f"{cfg.split}{f' {name}' if name else ''}: loss {split['loss']:.4f} | ppl "
            f"{split['ppl']:.2f} | bits/byte {split['bits_per_byte']:.4f} | "
            f"{split['tokens']:,} tokens in {split['documents']:,} documents | "
            f"{split['tokens_per_s'] or 0:,.0f} tokens/s"
        )
    if "" in scored:
        result.update(scored[""])
    elif scored:  # a mixture: each source apart, and the mean weighted by the mixture
        total = sum(w for _, w in sources.values())
        share = {name: w / total for name, (_, w) in sources.items()}
        loss = sum(share[n] * r["loss"] for n, r in scored.items())
        bpb = sum(share[n] * r["bits_per_byte"] for n, r in scored.items())
        result.update(
            split=cfg.split, loss=loss, ppl=math.exp(min(loss, 700.0)), bits_per_byte=bpb,
            tokens=sum(r["tokens"] for r in scored.values()), sources=scored,
        )  # fmt: skip
        log(f"{cfg.split} mixture (weighted): loss {loss:.4f} | bits/byte {bpb:.4f}")
    samples = None
    if names:
        if p.tokenizer is None:
            raise SourceError(f"{p.path} has no tokenizer: lm-eval tasks need one")
        lm = PretrainLM(
            p.model,
            p.tokenizer,
            p.config.block_size,
            batch_size=cfg.batch_size,
            device=device,
            precision=cfg.precision,
        )
        res = run_tasks(
            lm, names, limit=cfg.limit, num_fewshot=cfg.num_fewshot, log_samples=bool(cfg.output)
        )
        result["tasks"] = task_metrics(res)
        samples = res.get("samples")
        for task, metrics in result["tasks"].items():
            log(f"{task}: " + " | ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "samples": samples}, indent=1, default=str))
    return result


def parse_args(argv: list[str]) -> EvalConfig:
    """key=value overrides (Hydra's syntax) onto the typed EvalConfig; an unknown key or a
    value of the wrong type fails naming it."""
    base = OmegaConf.structured(EvalConfig)
    OmegaConf.set_struct(base.data.mix, False)  # sources are named on the command line
    valid: list[str] = []
    for f in fields(EvalConfig):
        sub = [f"data.{g.name}" for g in fields(EvalDataConfig)] if f.name == "data" else []
        valid += sub or [f.name]
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key.startswith("data.mix."):  # data.mix.<name>[.dir|.weight]
            rest = key.split(".")[3:]
            if not rest or (len(rest) == 1 and rest[0] in {f.name for f in fields(SourceConfig)}):
                continue
        if "=" not in arg or key not in valid:
            close = difflib.get_close_matches(key, valid, n=1) if "=" in arg else []
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{'unknown key' if '=' in arg else 'not key=value'}: {arg!r}.{hint} "
                f"Valid keys: {', '.join(valid)}"
            )
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None)
        raise ConfigError(f"{where + ': ' if where else ''}{str(e).splitlines()[0]}") from e
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _non_finite(value: Any, path: str = "") -> list[str]:
    """The keys (dotted) of the non-finite numbers in a result."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{path}.{k}" if path else k)]
    return []


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    try:
        result = evaluate(parse_args(sys.argv[1:] if argv is None else argv))
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    bad = [k for k in _non_finite(result) if not k.endswith("tokens_per_s")]
    # JSON has no NaN: such numbers are written as null, and the exit status says it.
    print(json.dumps(_finite_or_null(result), allow_nan=False), flush=True)
    if bad:
        print(
            f"error: {', '.join(bad)} not finite: the model's weights give NaN/inf (a checkpoint "
            "saved after the loss diverged, or a damaged file); evaluate an earlier checkpoint",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
