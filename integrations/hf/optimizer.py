"""Build the archopt optimizer for a Trainer's model, keeping the Trainer's conventions.

Both ways in (``enable()`` and ``ArchOptTrainer``) end here. The optimizer is planned on the real
``nn.Module`` the Trainer holds (structural roles: tied embeddings, GQA, fused QKV, experts), not on
the two flat param groups the Trainer would build for a stock optimizer.

The Trainer's no-decay convention is kept: every parameter the Trainer excludes from weight decay
(``get_decay_parameter_names``: biases, LayerNorm modules, names with "norm") runs with
``weight_decay=0`` whatever its planned rule, on top of archopt's own role defaults (norms and
biases take no decay). The plan summary is printed once per optimizer build, by process 0 only.
"""

from __future__ import annotations

import fnmatch
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from archopt_plugins import ArchOpt
from archopt_plugins.planner.plan import Plan, make_plan

from .arguments import check_stack, hparams_from_args

logger = logging.getLogger(__name__)


def _glob_escape(fqn: str) -> str:
    """An fnmatch pattern that matches exactly ``fqn``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in fqn)


def _user_sets_weight_decay(entry: Any, user: dict[str, dict[str, Any]]) -> bool:
    for key, values in user.items():
        if "weight_decay" not in values:
            continue
        if key == entry.role or any(fnmatch.fnmatchcase(n, key) for n in (entry.fqn, *entry.aliases)):
            return True
    return False


def no_decay_overrides(plan: Plan, model: nn.Module, decay_names: Iterable[str],
                       user: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, float]]:
    """Overrides giving ``weight_decay=0`` to planned parameters the Trainer would not decay.

    A tied tensor is decided by the name the Trainer itself uses for it (its first name in
    ``named_parameters()``), whichever alias the plan lists. Entries whose rule has no
    ``weight_decay``, that already have 0, or whose weight decay the user's overrides set need nothing.
    """
    decay = set(decay_names)
    every_name = dict(model.named_parameters(remove_duplicate=False))
    first_name = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for entry in plan.entries:
        tensor = every_name.get(entry.fqn)
        if tensor is None or first_name.get(id(tensor)) in decay:
            continue
        if entry.hparams.get("weight_decay", 0.0) != 0.0 and not _user_sets_weight_decay(entry, user or {}):
            out[_glob_escape(entry.fqn)] = {"weight_decay": 0.0}
    return out


def stock_decay_parameter_names(model: nn.Module) -> list[str]:
    """The stock Trainer's decay list (its method reads only the model, so no Trainer is needed)."""
    from transformers import Trainer

    return Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]


def build_for_trainer(model: nn.Module, args: Any, *,
                      decay_names: Callable[[nn.Module], Iterable[str]] = stock_decay_parameter_names,
                      overrides: dict[str, dict[str, Any]] | None = None, log_plan: bool = True) -> ArchOpt:
    """The ArchOpt that ``args`` (``--optim archopt_*``, ``--optim_args`` …) asks for, on ``model``."""
    check_stack(args)
    name, hparams = hparams_from_args(args)
    user = dict(overrides or {})
    plan, tensors = make_plan(model, name, **hparams, overrides=user or None)
    extra = no_decay_overrides(plan, model, decay_names(model), user)
    if extra:
        plan, tensors = make_plan(model, name, **hparams, overrides={**extra, **user})
    optimizer = ArchOpt.from_plan(plan, tensors)
    if log_plan and getattr(args, "process_index", 0) == 0:
        report_plan(optimizer.plan, extra)
    return optimizer


def report_plan(plan: Plan, no_decay: dict[str, Any]) -> None:
    """Print the plan for the person starting the run (the Trainer prints progress the same way)."""
    note = ""
    if no_decay:
        note = (f"\n(weight_decay=0 for {len(no_decay)} parameter(s) the Trainer excludes from decay: "
                f"{', '.join(sorted(no_decay))[:300]})")
    print(f"{plan.summary()}{note}", file=sys.stdout, flush=True)
    logger.info("archopt plan %r built for the Trainer (%d tensors)", plan.name, len(plan.entries))
