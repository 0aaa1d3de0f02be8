"""The model as an lm-evaluation-harness `LM`, and running lm_eval's tasks on it.

The model is wrapped as an lm_eval `LM` (`PretrainLM`), so the tasks, prompts and metrics are
lm_eval's own; the tasks shipped in this repo (`pretrain/tasks/`) are found without any flag.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from pretrain.config import ConfigError
from pretrain.engine.precision import autocast
from pretrain.tasks import TASKS_DIR
from pretrain.tokenizer import TextTokenizer


def _template_lm() -> type:
    from lm_eval.api.model import TemplateLM

    return TemplateLM


class PretrainLM(_template_lm()):  # type: ignore[misc]
    """Our GPT as an lm-evaluation-harness model: any lm_eval task runs on any model
    `load_pretrained` reads, with lm_eval's own request building (`TemplateLM`) and the same
    scoring as its HF model (`HFLM`) on our export: inputs are context + continuation cut to
    the last block_size + 1 tokens, minus the last. As `HFLM` does with the exported tokenizer,
    text is encoded with what the tokenizer puts before a document (its BOS, for a Hugging Face
    tokenizer whose post-processor adds one: Llama 3's, Llama 2's), and an empty context is the
    tokenizer's BOS where it has one, else EOS (our sentencepiece data: every document follows
    an EOS, and its export names EOS as the BOS)."""

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
        if self.tok.kind == "hf" and self.tok.bos_id >= 0:
            return self.tok.bos_id
        return self.tok.eos_id  # documents start after EOS (our BOS is never trained)

    @property
    def max_length(self) -> int:
        return self.block

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kw: Any
    ) -> list[int]:
        head = self.tok.document_ends()[0] if add_special_tokens is not False else []
        return [*head, *self.tok.encode(string)]

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
