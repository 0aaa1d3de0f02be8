"""Data order and model quality: the same model trained with our loader, with the previous
order and with nanoGPT's uniform sampler, side by side in one run, on the demo corpus and on a
corpus whose files are grouped by source; plus our loader stopped halfway and resumed elastically.

    python -m benchmarks.bench_order [--steps 400] [--demo-files N]

Everything but the order of the windows is the same in every run: the demo experiment's model
(conf/model/tiny.yaml, vocab from the data), AdamW (lr 2e-3, weight decay 0.1, clip 1.0), cosine
schedule with 50 warm-up steps, micro-batch 16 x seq 128 x accumulation 2 (4096 tokens a step),
the same initial weights, the same train and val documents (one prepare, with this code).

    ours       TokenLoader as a training run builds it (data.partitions 1024, 1 worker).
    previous   the order before this change, emulated exactly: prepare filled shards in input
               order (documents whole, closed before 2^19 tokens), and the loader's one reader
               went through the shards in a seeded order, each shard's documents and windows
               shuffled within the shard: a batch came from one shard.
    uniform    nanoGPT's sampler: random windows drawn uniformly (with replacement) from one
               array of all train tokens.
    resumed    ours, run as 2 ranks x 2 workers (micro-batch 16, no accumulation; the 2 ranks'
               gradients averaged as DDP does, in this process) for the first half, then
               "checkpointed" (model, optimizer and loader states through torch.save) and
               resumed as 1 rank with 1 worker and accumulation 2: an elastic resume.

Reported per corpus: the val loss over the whole val split at the end, its difference from the
uniform sampler's, and the largest rise of the logged train loss (mean of each 20 steps, as
`logging.every=20` logs it) above its lowest earlier value after warm-up.
The grouped corpus is built from the running Python's standard library, in three sources whose
files sort by source: a-code (source files), b-prose (the docstrings of other modules) and
c-manual (the reference manual's topics in pydoc_data), about 200 documents each.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import platform
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from pretrain.config import OptimConfig, ScheduleConfig
from pretrain.data import TokenLoader, read_manifest
from pretrain.data.loader import doc_order, shard_order, window_order
from pretrain.data.sources import stdlib_files
from pretrain.evaluation.loss import mean_loss
from pretrain.model import GPT, GPTConfig
from pretrain.optim import build_optimizer, lr_at
from pretrain.prepare import PrepareConfig, TokenizerConfig, run_prepare

REPO = Path(__file__).resolve().parents[1]
SEQ, MICRO, ACCUM, WARMUP, LOG_EVERY = 128, 16, 2, 50, 20
DATA_SEED, RUN_SEED = 1234, 1337  # data.seed and run.seed defaults
OLD_SHARD_TOKENS = 1 << 19  # prepare's shard_tokens default

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


# ---- corpora -----------------------------------------------------------------------------


def grouped_corpus(root: Path, per_source: int = 200) -> Path:
    """Three sources from the stdlib, written so that their files sort by source."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        Path(f)
        for f in stdlib_files()
        if not {"test", "tests", "encodings", "idlelib"} & set(Path(f).relative_to(lib).parts)
        and 2_000 <= os.path.getsize(f) <= 60_000
    )
    code, rest = files[::2], files[1::2]
    step = max(1, len(code) // per_source)
    for i, f in enumerate(code[::step][:per_source]):
        _write(root / "a-code" / f"{i:04d}.txt", f.read_text(encoding="utf-8", errors="replace"))
    n = 0
    for f in rest:  # the docstrings of the other modules: English prose about code
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree] + [
            x for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.ClassDef))
        ]
        docs = [d for x in nodes if (d := ast.get_docstring(x))]  # type: ignore[arg-type]
        text = "\n\n".join(docs)
        if len(text) >= 1_000 and n < per_source:
            _write(root / "b-prose" / f"{n:04d}.txt", text + "\n")
            n += 1
    from pydoc_data.topics import topics  # the reference manual, as `help()` shows it

    chunks, buf = [], ""
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            buf += para + "\n\n"
            if len(buf) >= 2_000:
                chunks.append(buf)
                buf = ""
    for i, text in enumerate(chunks[:per_source]):
        _write(root / "c-manual" / f"{i:04d}.txt", text)
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def prepare(corpus: str, out: Path, vocab: int, val_fraction: float) -> Path:
    cfg = PrepareConfig(
        input=corpus,
        output=str(out),
        tokenizer=TokenizerConfig(vocab_size=vocab),
        val_fraction=val_fraction,
    )
    with contextlib.redirect_stdout(io.StringIO()) as log:
        run_prepare(cfg)
    print("  " + log.getvalue().strip().replace("\n", "\n  "))
    return out


# ---- the three orders ------------------------------------------------------------------------


def _train_docs(data: Path) -> list[np.ndarray]:
    """The train split's documents in input order (their keys), read from the tars."""
    m = read_manifest(data)
    docs: dict[int, np.ndarray] = {}
    for s in m.shards("train"):
        with tarfile.open(data / s.name) as tar:
            for member in tar.getmembers():
                if member.name.endswith(m.token_ext):
                    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                    docs[int(member.name.split(".")[0])] = np.frombuffer(raw, m.np_dtype)
    return [docs[k] for k in sorted(docs)]


def previous_order(data: Path) -> Batches:
    """The order before this change (see the module docstring), for one reader."""
    shards: list[list[np.ndarray]] = [[]]
    tokens = 0
    for d in _train_docs(data):  # prepare: documents in input order, shards closed at 2^19
        if shards[-1] and tokens + len(d) > OLD_SHARD_TOKENS:
            shards.append([])
            tokens = 0
        shards[-1].append(d)
        tokens += len(d)
    n, window = len(shards), SEQ + 1
    rows: list[np.ndarray] = []
    for e in range(10**6):
        for s in shard_order(DATA_SEED, e, n).tolist():
            docs = shards[s]
            flat = np.concatenate([docs[i] for i in doc_order(DATA_SEED, e, s, len(docs))])
            nwin = len(flat) // window
            windows = flat[: nwin * window].reshape(nwin, window)
            for r in window_order(DATA_SEED, e, s, nwin).tolist():
                rows.append(windows[r])
                if len(rows) == MICRO:
                    batch = np.stack(rows).astype(np.int64)
                    rows = []
                    yield torch.from_numpy(batch[:, :-1]), torch.from_numpy(batch[:, 1:])
    raise AssertionError("unreachable")


def uniform(data: Path) -> Batches:
    """nanoGPT's get_batch: uniform random windows of one array of all train tokens."""
    flat = np.concatenate(_train_docs(data))  # uint16, as nanoGPT's train.bin
    g = torch.Generator().manual_seed(DATA_SEED)
    while True:
        ix = torch.randint(len(flat) - SEQ - 1, (MICRO,), generator=g).tolist()
        yield (
            torch.stack([torch.from_numpy(flat[i : i + SEQ].astype(np.int64)) for i in ix]),
            torch.stack([torch.from_numpy(flat[i + 1 : i + 1 + SEQ].astype(np.int64)) for i in ix]),
        )


def ours(data: Path) -> TokenLoader:
    return TokenLoader(data, "train", SEQ, MICRO, seed=DATA_SEED, num_workers=1)


# ---- training ---------------------------------------------------------------------------------


class Run:
    """The model, optimizer and schedule of the demo experiment, one optimizer step at a time."""

    def __init__(self, vocab: int, steps: int) -> None:
        raw = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
        self.cfg = GPTConfig(**raw)
        self.cfg.vocab_size = vocab
        torch.manual_seed(RUN_SEED)
        self.model = GPT(self.cfg)
        self.opt = build_optimizer(
            self.model, OptimConfig(lr=2e-3, weight_decay=0.1), torch.device("cpu")
        )
        self.sched = ScheduleConfig(name="cosine", warmup_steps=WARMUP, min_lr_ratio=0.1)
        self.steps, self.step, self.losses = steps, 0, []

    def update(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step over micro-batches that together are one global batch."""
        total = 0.0
        for x, y in micro_batches:
            _, loss = self.model(x, y)
            (loss / len(micro_batches)).backward()
            total += float(loss.detach()) / len(micro_batches)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.steps, 2e-3, self.sched)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(total)

    def checkpoint(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "losses": self.losses}, buf)  # fmt: skip
        return buf.getvalue()

    def restore(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.losses = state["step"], state["losses"]

    @torch.no_grad()
    def val_loss(self, data: Path) -> float:
        """Mean loss over every window of the whole val split (equal-size batches)."""
        self.model.eval()
        loader = TokenLoader(data, "val", SEQ, MICRO, seed=DATA_SEED, loop=False, partitions=None)
        loss = mean_loss(lambda x, y: self.model(x, y)[1], loader, torch.device("cpu"))
        self.model.train()
        return float(loss)


def train(vocab: int, steps: int, batches: Callable[[], Batches]) -> Run:
    run = Run(vocab, steps)
    it = batches()
    while run.step < steps:
        run.update([next(it) for _ in range(ACCUM)])
    return run


def train_resumed(data: Path, vocab: int, steps: int) -> Run:
    run = Run(vocab, steps)
    # First half: 2 ranks x 2 workers, micro-batch 16 each, no accumulation (DDP's mean of the
    # ranks' gradients is the mean of the 2 micro-batches' losses, as `update` computes it).
    ranks = [
        TokenLoader(data, "train", SEQ, MICRO, rank=r, world_size=2, num_workers=2, seed=DATA_SEED)
        for r in range(2)
    ]
    its = [iter(ld) for ld in ranks]
    while run.step < steps // 2:
        run.update([next(it) for it in its])
    states = [ld.state_dict() for ld in ranks]
    blob = run.checkpoint()
    del its, ranks
    # The new job: 1 rank, 1 worker, accumulation 2; weights, optimizer and data position restored.
    run = Run(vocab, steps)
    run.restore(blob)
    loader = ours(data)
    loader.load_state_dict(states)
    it = iter(loader)
    while run.step < steps:
        run.update([next(it) for _ in range(ACCUM)])
    return run


SAMPLERS = ("uniform", "previous", "ours", "resumed")


def run_sampler(sampler: str, data: Path, vocab: int, steps: int) -> Run:
    if sampler == "resumed":
        return train_resumed(data, vocab, steps)
    batches: Callable[[], Batches] = {
        "uniform": lambda: uniform(data),
        "previous": lambda: previous_order(data),
        "ours": lambda: iter(ours(data)),
    }[sampler]
    return train(vocab, steps, batches)


def logged(losses: list[float]) -> list[tuple[int, float]]:
    """(step, mean loss of the LOG_EVERY steps up to it), as logging.every=20 logs it."""
    return [
        (s, sum(losses[s - LOG_EVERY : s]) / LOG_EVERY)
        for s in range(LOG_EVERY, len(losses) + 1, LOG_EVERY)
    ]


def max_rise(losses: list[float]) -> float:
    """The largest rise of the logged train loss above its lowest earlier logged value, after
    warm-up."""
    points = [v for s, v in logged(losses) if s > WARMUP]
    return max((v - min(points[: i + 1]) for i, v in enumerate(points)), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--demo-files", type=int, default=0, help="first N stdlib files (0: all)")
    ap.add_argument(
        "--corpora", nargs="+", default=["demo", "grouped"], choices=["demo", "grouped"]
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a busy machine)"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpora: dict[str, Path] = {}
        if "demo" in a.corpora:
            print("preparing the demo corpus (the stdlib, vocab 2048, as `make demo` does)")
            demo_input: str = "stdlib"
            if a.demo_files:
                files = sorted(stdlib_files())[: a.demo_files]
                for i, f in enumerate(files):
                    os.symlink(f, work / f"demo-{i:05d}.py")
                demo_input = str(work / "demo-*.py")
            corpora["demo"] = prepare(demo_input, work / "demo", 2048, 0.005)
        if "grouped" in a.corpora:
            print("preparing the grouped corpus (3 sources whose files sort by source, vocab 2000)")
            grouped = grouped_corpus(work / "grouped-src")
            corpora["grouped"] = prepare(
                str(grouped / "**" / "*.txt"), work / "grouped", 2000, 0.05
            )
        for name, data in corpora.items():
            vocab = read_manifest(data).vocab_size
            results[name] = {}
            for sampler in SAMPLERS:
                t = time.perf_counter()
                run = run_sampler(sampler, data, vocab, a.steps)
                val = run.val_loss(data)
                results[name][sampler] = (val, logged(run.losses)[-1][1], max_rise(run.losses))
                print(f"  {name:8s} {sampler:9s} val {val:.4f}  train {logged(run.losses)[-1][1]:.4f}  "
                      f"max rise {max_rise(run.losses):.3f}  ({time.perf_counter() - t:.0f}s)",
                      flush=True)  # fmt: skip
            m = read_manifest(data)
            results[name]["_info"] = (
                m.num_tokens["train"],
                m.num_documents["train"],
                len(m.shards("train")),
            )  # type: ignore[assignment]
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load0:.1f} at "
        f"start; {a.steps} steps of 4096 tokens, model tiny, seq 128, {a.threads} torch thread(s)\n"
    )
    for name, rows in results.items():
        tokens, docs, shards = rows.pop("_info")  # type: ignore[misc]
        print(f"{name}: {docs:,} train documents, {tokens:,} train tokens, {shards} train shards\n")
        print(
            "| sampler | val loss | vs uniform | last logged train loss | max rise after warm-up |"
        )
        print("|---|---:|---:|---:|---:|")
        base = rows["uniform"][0]
        for sampler, (val, last, rise) in rows.items():
            print(f"| {sampler} | {val:.4f} | {val - base:+.4f} | {last:.4f} | {rise:.3f} |")
        ok = all(abs(rows[s][0] - base) <= 0.05 and rows[s][2] <= 0.3 for s in ("ours", "resumed"))
        print(
            f"\ngoal (ours and resumed within 0.05 nats of uniform, rise <= 0.3): {'met' if ok else 'NOT met'}\n"
        )


if __name__ == "__main__":
    main()
