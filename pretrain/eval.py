"""`python -m pretrain.eval checkpoint=<run dir | checkpoint | HF dir> data.dir=<prepared dir>`

Evaluates a trained model, loaded from any form it is stored in (`pretrain.pretrained`):

* on a split of a prepared data dir (`split=val` by default, the whole split unless
  `max_documents` says otherwise): loss (mean NLL per token, nats), perplexity, bits per byte
  and the tokens evaluated;
* on downstream tasks through lm-evaluation-harness (`tasks=pyline`, or any task lm_eval knows:
  `tasks='hellaswag,arc_easy'` where the hub is reachable). The model is wrapped as an lm_eval
  `LM` (`PretrainLM`), so the tasks, prompts and metrics are lm_eval's own; the tasks shipped in
  this repo (`pretrain/tasks/`) are found without any flag.

The last line on stdout is one JSON object: `loss`, `ppl`, `bits_per_byte`, `tokens`, `bytes`,
`documents`, `tokens_per_s` (with a data dir) and `tasks` ({task: {metric: value}}).

How a split is scored. Each document is scored on its own, conditioned on EOS (every document
in the training stream follows one): the sequence EOS + document (the document ends with the
EOS prepare appended, so the end of a document is predicted too) is cut into disjoint windows
of `seq_len` predictions (default block_size), each window seeing only its own tokens, which is
lm_eval's rolling log-likelihood (context_len=1). So the result does not depend on the batch
size or on the order of documents, and every token of the split is predicted exactly once:
`tokens` is the split's token count. Bits per byte = total NLL / ln 2 / the UTF-8 bytes of the
documents' text (decoded with the data's tokenizer; exact for any text without U+2581,
sentencepiece's space marker), so models with different tokenizers compare.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ConfigError
from pretrain.data.shards import DataError, Manifest, fetch, read_manifest, read_shard, resolve
from pretrain.model import GPT
from pretrain.pretrained import (
    Pretrained,
    SourceError,
    TextTokenizer,
    check_tokenizer,
    load_pretrained,
)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass
class EvalDataConfig:
    dir: str = ""
    """Prepared data dir (holds manifest.json) whose split is scored; empty = tasks only."""
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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"precision={precision!r}: choose fp32 or bf16")


# ---------------------------------------------------------------------------------------------
# A split: loss, perplexity, bits per byte
# ---------------------------------------------------------------------------------------------


def windows(doc: np.ndarray, eos_id: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) windows that predict every token of `doc` once, conditioned on EOS.

    doc: [n] token ids (ending in EOS). The stream EOS + doc is cut into disjoint chunks of up to
    seq_len targets; each chunk's inputs are the tokens right before its targets."""
    n = len(doc)
    stream = np.concatenate([[eos_id], doc]).astype(np.int64)  # [n + 1]
    return [
        (stream[s : min(s + seq_len, n)], stream[s + 1 : s + 1 + seq_len])
        for s in range(0, n, seq_len)
    ]


@torch.no_grad()
def score_windows(
    model: torch.nn.Module,
    wins: list[tuple[np.ndarray, np.ndarray]],
    batch_tokens: int,
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """Total NLL (nats) of the targets of `wins`. Windows are batched by length (longest first),
    right-padded; padded targets are ignored, and causal attention keeps padding out of the
    real positions."""
    order = sorted(range(len(wins)), key=lambda i: -len(wins[i][0]))
    total = 0.0
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
        with autocast(device, precision):
            logits, _ = model(x.to(device))  # [B, T, V] fp32
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="sum"
        )
        total += float(nll.double().item())
    return total


def data_tokenizer(manifest: Manifest, *, allow_pipe: bool = False) -> Any:
    import sentencepiece as spm

    proto = fetch(resolve(manifest.source, manifest.tokenizer, allow_pipe=allow_pipe))
    return spm.SentencePieceProcessor(model_proto=proto)


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
    sp = data_tokenizer(manifest, allow_pipe=allow_pipe)
    nll, tokens, n_bytes, n_docs, elapsed = 0.0, 0, 0, 0, 0.0
    was_training = model.training
    model.eval()
    try:
        # Shard by shard: memory holds one shard's windows, however large the split.
        for shard in manifest.shards(split):
            docs = [tokens for tokens, _ in read_shard(manifest, shard, allow_pipe=allow_pipe)]
            if max_documents:
                docs = docs[: max_documents - n_docs]
            n_bytes += sum(len(sp.decode([int(t) for t in d]).encode("utf-8")) for d in docs)
            wins = [w for d in docs for w in windows(d, manifest.eos_id, seq_len)]
            start = time.perf_counter()
            nll += score_windows(model, wins, batch_tokens, device, precision)
            elapsed += time.perf_counter() - start
            tokens += sum(len(d) for d in docs)
            n_docs += len(docs)
            if n_docs == max_documents:
                break
    finally:
        model.train(was_training)
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


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ---------------------------------------------------------------------------------------------


def _template_lm() -> type:
    from lm_eval.api.model import TemplateLM

    return TemplateLM


class PretrainLM(_template_lm()):  # type: ignore[misc]
    """Our GPT as an lm-evaluation-harness model: any lm_eval task runs on any model
    `load_pretrained` reads, with lm_eval's own request building (`TemplateLM`) and the same
    scoring as its HF model (`HFLM`): inputs are context + continuation cut to the last
    block_size + 1 tokens, minus the last; an empty context is EOS."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        block_size: int,
        *,
        batch_size: int = 16,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.model, self.tok, self.block = model, tokenizer, block_size
        self.batch = batch_size
        self.dev, self.precision = torch.device(device), precision

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eos_id  # documents start after EOS (our BOS is never trained)

    @property
    def max_length(self) -> int:
        return self.block

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kw: Any
    ) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kw: Any) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kw: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) for each
        (key, context ids, continuation ids)."""
        prepared = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self.block + 1) :]
            prepared.append((whole[:-1], cont))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        for b in range(0, len(order), self.batch):
            idx = order[b : b + self.batch]
            longest = len(prepared[idx[0]][0])
            x = torch.zeros(len(idx), longest, dtype=torch.long)
            for r, i in enumerate(idx):
                inp = prepared[i][0]
                x[r, : len(inp)] = torch.tensor(inp)
            with autocast(self.dev, self.precision):
                logits, _ = self.model(x.to(self.dev))  # [B, T, V], padded ids at -inf
            logp = logits.float().log_softmax(-1)
            for r, i in enumerate(idx):
                inp, cont = prepared[i]
                n = len(cont)
                lp = logp[r, len(inp) - n : len(inp)]  # [n, V]: the predictions of cont
                target = torch.tensor(cont, device=lp.device)
                ll = float(lp.gather(-1, target[:, None]).sum().item())
                out[i] = (ll, bool((lp.argmax(-1) == target).all().item()))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        result = []
        for (string,) in [req.args for req in requests]:
            wins = map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            result.append(
                sum(ll for ll, _ in self._loglikelihood_tokens([(None, *w) for w in wins]))
            )
        return result

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kw = dict(gen_kwargs)
            until = kw.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 256))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ids = self.tok_encode(context)[-max(1, self.block - max_new) :] or [self.eot_token_id]
            with autocast(self.dev, self.precision):
                gen = self.model.generate(  # type: ignore[operator]
                    torch.tensor([ids], device=self.dev),
                    max_new,
                    temperature=temperature,
                    eos_id=self.eot_token_id,
                )
            text = self.tok_decode(gen[0, len(ids) :].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def run_tasks(
    lm: Any, names: list[str], *, limit: int = 0, num_fewshot: int = -1, log_samples: bool = False
) -> dict[str, Any]:
    """lm_eval's results for `names` on `lm` (an lm_eval LM), with this repo's tasks included."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Indexing lm_eval's own ~15k task configs takes seconds: only when a name needs it.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(TASKS_DIR))
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = [
            f"{n} (did you mean {', '.join(difflib.get_close_matches(n, known, n=3))}?)"
            if difflib.get_close_matches(n, known, n=1)
            else n
            for n in unknown
        ]
        raise ConfigError(
            f"unknown lm-eval task(s): {'; '.join(hints)}. This repo ships "
            f"{', '.join(sorted(p.stem for p in TASKS_DIR.glob('*/*.yaml')))}; `lm_eval ls tasks` "
            "lists the others"
        )
    res = simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=manager,
        limit=limit or None,
        num_fewshot=None if num_fewshot < 0 else num_fewshot,
        log_samples=log_samples,
        bootstrap_iters=0,
    )
    assert res is not None
    return dict(res)


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval's results ("acc,none" -> "acc"; no stderr)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))
        }
    return out


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig, log: Any = print) -> dict[str, Any]:
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint= is required: a run directory, a checkpoint or a Hugging Face directory"
        )
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not cfg.data.dir and not names:
        raise ConfigError(
            "nothing to evaluate: give data.dir=<prepared dir> (loss, ppl, bits per byte) "
            "and/or tasks=<lm-eval task names>"
        )
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    autocast(device, cfg.precision)  # refuse a bad precision before loading anything
    p: Pretrained = load_pretrained(cfg.checkpoint, device)
    result: dict[str, Any] = {"checkpoint": str(p.path), "kind": p.kind}
    log(f"eval: {p.describe()} | {p.model.num_params() / 1e6:.2f}M params | {device.type}")
    if cfg.data.dir:
        manifest = read_manifest(cfg.data.dir, allow_pipe=cfg.data.allow_pipe)
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
        result.update(split, data=str(cfg.data.dir))
        log(
            f"{cfg.split}: loss {split['loss']:.4f} | ppl {split['ppl']:.2f} | "
            f"bits/byte {split['bits_per_byte']:.4f} | {split['tokens']:,} tokens in "
            f"{split['documents']:,} documents | {split['tokens_per_s'] or 0:,.0f} tokens/s"
        )
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
    valid: list[str] = []
    for f in fields(EvalConfig):
        sub = [f"data.{g.name}" for g in fields(EvalDataConfig)] if f.name == "data" else []
        valid += sub or [f.name]
    for arg in argv:
        key = arg.split("=", 1)[0]
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


def main(argv: list[str] | None = None) -> int:
    try:
        result = evaluate(parse_args(sys.argv[1:] if argv is None else argv))
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
