"""Training: one run of the loop and the components it orchestrates.

    loop.py        train(cfg): setup, build, resume, loop, teardown (the `pretrain.train`
                   command's run)
    setup.py       the run's facts: the data's manifest, the batch geometry, the model config
    rundir.py      the run directory's config.yaml and tokenizer copy
    state.py       TrainState: step, tokens, run id, early-stopping record, masks, loader
                   position, RNG; what a checkpoint restores besides the engine's tensors
    start.py       where the weights come from: a resume, `train.init_from`, or fresh
    validate.py    Validator: the val loader (built once), its cadence, early stopping and the
                   sweep's pruner
    guards.py      preemption, NaN/inf, and every early end of the loop with its exit status
    throughput.py  tokens/s and MFU between logging steps

Parallelism is not here: the loop sees an `Engine` (`pretrain/engine/`). Checkpoints
(`pretrain/checkpoint.py`) and metrics (`pretrain/metrics.py`) are the loop's sinks.
"""
