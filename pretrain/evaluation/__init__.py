"""Evaluating a model: one loss routine, shared by in-loop validation and `pretrain.eval`.

    loss.py      the routine: the summed NLL over the targets of (x, y) batches (y = -1 is
                 ignored), for any forward that returns a batch's mean loss
    split.py     a prepared split, document by document: loss, perplexity, bits per byte
    harness.py   the model as an lm-evaluation-harness `LM`, and running its tasks

The CLI (`python -m pretrain.eval`) is `pretrain/eval.py`; in-loop validation during training
is `pretrain/training/validate.py`. Both score through `loss.total_nll`, and both run the model
under the one autocast of `pretrain.engine.precision`.
"""
