"""python -m pretrain.plan ...: see `pretrain.plan.cli`."""

from pretrain.plan.cli import main

main()
