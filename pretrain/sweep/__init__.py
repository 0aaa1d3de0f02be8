"""Hyperparameter search: Hydra multirun (`-m`) over the training app, grid, random or Bayesian.

    python -m pretrain.train -m experiment=demo optim.lr=1e-4,3e-4,1e-3     # Hydra's grid
    python -m pretrain.train -m experiment=demo hydra/sweeper=optuna hydra.sweeper.sampler=tpe \\
        hydra.sweeper.n_trials=20 'optim.lr=tag(log, interval(1e-4, 1e-2))'  # Optuna

Every trial is an ordinary run in a directory of its own, and the sweep directory holds the rest:

    <hydra.sweep.dir>/              sweeps/<run.name> unless set: the same command finds it again
        study.journal               the Optuna study (a file: no database server)
        results.csv                 one row per trial: parameters, result, state, steps, tokens,
                                    wall time, run dir
        optimization_results.yaml   best_params and best_value (as Hydra's Optuna sweeper writes)
        history.png, params.png, intermediate.png    the plots
        <n>/                        trial n's run directory (config.yaml, metrics.jsonl, loss.png,
                                    checkpoints/, wandb/), plus
            trial.yaml              the trial's overrides: it only ever resumes as itself
            result.json             how it ended: state, objective value, steps, tokens, times

Where each part lives:

    trial.py              the training app's side: a trial's run dir, W&B group, pruning
                          reports, result.json, and the process state torn down between trials
    space.py              Hydra's sweep syntax -> Optuna distributions (and grids)
    study.py              storage, samplers, pruners, and how a study is continued
    lock.py               the file lock on a sweep directory and on a trial's run directory
    schema.py             the configs of `hydra/sweeper=optuna`, its samplers and pruners, and
                          `hydra/launcher=torchrun` (registered by hydra_plugins/pretrain_sweep)
    optuna_sweeper.py     `hydra/sweeper=optuna` (Hydra finds it in hydra_plugins/pretrain_sweep)
    torchrun_launcher.py  `hydra/launcher=torchrun`: each trial on several local processes
    results.py            results.csv, optimization_results.yaml and the plots
    callbacks.py          results of Hydra's basic sweeper (it knows nothing of them)

On Slurm, `hydra/launcher=submitit_slurm` (hydra-submitit-launcher) runs each trial as a job;
every task of it is a rank (`pretrain.engine.process_group.adopt_slurm_tasks`), and the
sweeper, in one process, is the only place parameters are chosen.
"""
