"""One rank of a TokenLoader run, started by torchrun from tests/distributed/test_loader.py.

Reads RANK / WORLD_SIZE from the environment (as torchrun sets them), iterates `--passes`
loop=False passes over the train split and saves what it saw to OUT/pass{p}-rank{r}.npy as
uint16 windows [batches, batch_size, seq_len + 1] (x, then y's last token; an ignored target,
-1, is 65535). DATA is a data dir, or a mixture "name=dir:weight,name=dir:weight,...". With --save-at K it writes its state after the
K-th batch of the first pass to OUT/state-rank{r}.json. With --resume GLOB it then runs a second
loader that loads the states of all ranks of an earlier run and saves its passes as
OUT/resumed-pass{p}-rank{r}.npy (--fresh 0 skips the fresh loader).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

import numpy as np

from pretrain.data import Source, TokenLoader, read_manifest


def run_passes(
    loader: TokenLoader, a: argparse.Namespace, out: Path, prefix: str, rank: int
) -> None:
    for p_i in range(a.passes):
        seen = []
        for i, (x, y) in enumerate(loader):
            assert x.shape == y.shape == (a.batch, a.seq_len)
            assert ((x[:, 1:] == y[:, :-1]) | (y[:, :-1] == -1)).all()
            seen.append(np.concatenate([x.numpy(), y[:, -1:].numpy()], axis=1).astype("<u2"))
            if p_i == 0 and a.save_at is not None and i + 1 == a.save_at:
                (out / f"state-rank{rank}.json").write_text(json.dumps(loader.state_dict()))
        arr = np.stack(seen) if seen else np.zeros((0, a.batch, a.seq_len + 1), "<u2")
        np.save(out / f"{prefix}pass{p_i}-rank{rank}.npy", arr)
    (out / f"{prefix}epoch-rank{rank}.json").write_text(json.dumps({"epoch": loader.epoch}))


def data(spec: str) -> str | list[Source]:
    if "=" not in spec:
        return spec
    sources = []
    for part in spec.split(","):
        name, rest = part.split("=", 1)
        where, weight = rest.rsplit(":", 1)
        sources.append(Source(name, read_manifest(where), float(weight)))
    return sources


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partitions", type=int, default=24)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--fresh", type=int, default=1)
    a = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def make() -> TokenLoader:
        return TokenLoader(
            data(a.data),
            "train",
            a.seq_len,
            a.batch,
            rank=rank,
            world_size=world,
            num_workers=a.workers,
            seed=a.seed,
            loop=False,
            partitions=a.partitions,
        )

    if a.fresh:
        run_passes(make(), a, out, "", rank)
    if a.resume:
        loader = make()
        loader.load_state_dict(
            [json.loads(Path(f).read_text()) for f in sorted(glob.glob(a.resume))]
        )
        if loader.phase_change:
            (out / f"phase-rank{rank}.txt").write_text(loader.phase_change)
        a.save_at = None
        run_passes(loader, a, out, "resumed-", rank)


if __name__ == "__main__":
    main()
