"""Shared helpers: metrics, inference, losses, LR schedule, distributed set-up, checkpoints, logging."""
