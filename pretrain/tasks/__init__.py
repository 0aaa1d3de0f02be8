"""Downstream tasks shipped with pretrain, in lm-evaluation-harness's task format.

    lm_eval --model hf --model_args pretrained=<HF export> --tasks pyline \\
        --include_path $(python -c "import pretrain.tasks as t; print(t.TASKS_DIR)")
    python -m pretrain.eval checkpoint=<run dir | checkpoint | HF dir> tasks=pyline

pyline/   choose the true next line of a Python source file among four (see build_pyline.py)
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
