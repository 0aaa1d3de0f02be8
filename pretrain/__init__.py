"""pretrain: distributed GPT pretraining."""
