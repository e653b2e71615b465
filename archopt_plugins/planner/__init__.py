"""roles + name + hyperparameters → Plan (which rule and hyperparameters each parameter gets)."""

from .names import available_optimizers, get_name
from .plan import Plan, PlanEntry, build_plan, make_plan
from .rules import RULES, get_rule

__all__ = ["Plan", "PlanEntry", "build_plan", "make_plan", "available_optimizers", "get_name", "RULES", "get_rule"]
