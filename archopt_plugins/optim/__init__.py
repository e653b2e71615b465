"""plan → step: the torch.optim.Optimizer that runs a plan."""

from .archopt import ArchOpt, NonFiniteGradientError

__all__ = ["ArchOpt", "NonFiniteGradientError"]
