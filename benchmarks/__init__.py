"""Benchmarks and reports: the criss-cross attention op, the model's cost, a training step; one measurement helper."""
