"""Helpers that import nothing else of ours: command line, distributed set-up, checkpoints, losses, inference,
metrics, random states, logging, the LR schedule."""
