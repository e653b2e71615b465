"""archopt-plugins: architecture-aware optimizers for PyTorch training stacks.

Public API (fixed; see DESIGN.md):

    available_optimizers() -> list[str]
    plan(model, name="muon", **hparams) -> Plan
    build_optimizer(model, name="muon", **hparams) -> ArchOpt   # a torch.optim.Optimizer

``model`` is an nn.Module (structural role detection), (name, param) pairs (roles from names), or
params / param groups (roles from shapes). ``Plan.summary()`` prints what each parameter runs.
"""

from __future__ import annotations

from typing import Any

from .optim import ArchOpt, NonFiniteGradientError
from .planner import Plan, PlanEntry, available_optimizers, make_plan

__version__ = "0.1.0"


def plan(model: Any, name: str = "muon", **hparams: Any) -> Plan:
    """The plan ``build_optimizer`` would run: one entry (role, rule, hyperparameters) per parameter."""
    return make_plan(model, name, **hparams)[0]


def build_optimizer(model: Any, name: str = "muon", **hparams: Any) -> ArchOpt:
    """An ArchOpt optimizer for ``model`` under the named policy (see ``available_optimizers()``)."""
    return ArchOpt(model, name, **hparams)


__all__ = ["ArchOpt", "NonFiniteGradientError", "Plan", "PlanEntry", "available_optimizers", "build_optimizer",
           "plan"]
