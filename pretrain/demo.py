"""`make demo`: prepare the embedded corpus, train the `demo` experiment, print samples.

Everything runs through the same command-line entry points a user would type, so the demo
is also a smoke test of them. Extra arguments are passed to the training run as overrides.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DATA = Path("data/demo")
RUN = Path("runs/demo")


def run(args: list[str]) -> None:
    print("+ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main(argv: list[str]) -> None:
    if not (DATA / "manifest.json").is_file():
        # Python's own standard library sources: real text, no download.
        run(["-m", "pretrain.prepare", f"output={DATA}", "tokenizer.vocab_size=2048"])
    run(["-m", "pretrain.train", "experiment=demo", f"data.dir={DATA}", f"run.dir={RUN}", *argv])
    run(["-m", "pretrain.sample", f"checkpoint={RUN}", "prompt=def ", "max_new_tokens=120"])
    print(f"loss curve: {RUN / 'loss.png'}   metrics: {RUN / 'metrics.jsonl'}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
