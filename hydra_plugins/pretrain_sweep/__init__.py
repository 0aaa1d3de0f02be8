"""Hydra's entry points into `pretrain.sweep`: the Optuna sweeper and the torchrun launcher.

Hydra finds plugins by importing every module of the `hydra_plugins` namespace package at
start-up, so these modules only register configs and define thin classes; the work (and the
optuna import) lives in `pretrain/sweep/`, the config schemas in `pretrain/sweep/schema.py`.
"""
