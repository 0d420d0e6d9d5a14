"""The poly learning-rate schedule of the original: ``base_lr * (1 - iteration / max_iterations) ** power``."""
import torch


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """Learning rate for 0-based ``iteration`` (the first step uses ``base_lr``; reaches 0 at ``max_iterations``)."""
    if not 0 <= iteration <= max_iterations:
        raise ValueError(f"iteration must lie in [0, {max_iterations}], got {iteration}")
    return base_lr * (1.0 - iteration / max_iterations) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group (the original trains with one group)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
