"""The pyline dataset for lm_eval (`custom_dataset: !function utils.load`): pyline.jsonl next
to this file, so the task needs no download and no path relative to the working directory."""

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "pyline.jsonl"


def load(**kwargs: Any) -> Any:
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
