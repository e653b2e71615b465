"""Planning on the model DeepSpeed holds, whatever shapes DeepSpeed shows for its parameters.

DeepSpeed constructs a config optimizer from parameters only. The adapter takes the module from
the engine that is constructing it (``engine.module``, the model given to ``deepspeed.initialize``)
and plans on it, so roles come from the module structure (tied embeddings, GQA, fused QKV,
experts), with the parameters' names.

Under ZeRO-3 — and already at construction under ``deepspeed.zero.Init`` — a parameter's data is a
flat placeholder (``shape == (0,)`` on ranks that do not hold it) and its real shape is
``ds_shape``. Role detection reads shapes (``nn.Linear`` weights must be 2-D, a norm gain 1-D, the
plan records each shape), so while it runs every such parameter is shown with its real shape
through a zero-memory stand-in (one element broadcast to ``ds_shape``) and given back its own data
afterwards. Nothing reads the stand-in's values: scale-invariance probing, the one step that would,
refuses ZeRO-3 parameters by itself (``roles.scale_invariance``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from archopt_plugins.optim.archopt import ArchOpt
from archopt_plugins.planner.plan import Plan, make_plan


def real_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape as a layer (``ds_shape`` under ZeRO-3), not as DeepSpeed's placeholder."""
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(param.shape) if ds_shape is None else tuple(ds_shape)


@contextmanager
def shown_with_real_shapes(model: nn.Module) -> Iterator[None]:
    """Within the block, every ZeRO-3 placeholder parameter of ``model`` has its real shape.

    The engine's own forward hooks on the root module (timers and ZeRO bookkeeping, not ready while
    the engine is still being built) are set aside too, so the scale-invariance probe's forward
    runs the plain model under ZeRO stages 0-2.
    """
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = (model._forward_pre_hooks, model._forward_hooks)
    model._forward_pre_hooks, model._forward_hooks = OrderedDict(), OrderedDict()
    try:
        for p in model.parameters():
            shape = real_shape(p)
            if tuple(p.shape) != shape:
                stand_in = torch.zeros((), dtype=p.dtype, device=p.device).expand(shape)
                swapped.append((p, p.data))
                p.data = stand_in
        yield
    finally:
        for p, data in reversed(swapped):
            p.data = data
        model._forward_pre_hooks, model._forward_hooks = hooks


def _flat_params(model_parameters: Any) -> list[torch.Tensor]:
    """The tensors DeepSpeed hands the optimizer (params or param groups holding only params)."""
    items = list(model_parameters) if isinstance(model_parameters, Iterable) else []
    out: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, dict):
            extra = sorted(set(item) - {"params", "name"})
            if extra:
                raise ValueError(
                    f"deepspeed.initialize(model_parameters=...) holds a param group with settings {extra}; an "
                    "archopt optimizer plans every parameter from its role, so per-group settings would be "
                    "ignored. Pass model.parameters() and put per-role or per-name settings in the ds_config "
                    "optimizer params as \"overrides\": {\"*.bias\": {\"weight_decay\": 0.0}}")
            params = item["params"]
            out.extend([params] if isinstance(params, torch.Tensor) else list(params))
        else:
            out.append(item)
    return out


def plan_for_engine(module: nn.Module, model_parameters: Any, name: str,
                    hparams: dict[str, Any]) -> tuple[Plan, dict[str, torch.Tensor]]:
    """The plan for the parameters DeepSpeed gives the optimizer, from the module that holds them.

    Every trainable parameter of the module must be among ``model_parameters`` and vice versa (the
    plan covers each trainable parameter exactly once); a mismatch names the first parameter.
    """
    given = [p for p in _flat_params(model_parameters) if p.requires_grad]
    with shown_with_real_shapes(module):
        plan, tensors = make_plan(module, name, **hparams)
    planned = {id(t): fqn for fqn, t in tensors.items()}
    given_ids = {id(p) for p in given}
    missing = [fqn for fqn, t in tensors.items() if id(t) not in given_ids]
    if missing:
        raise ValueError(f"parameter {missing[0]!r} is trainable in the model but not among the "
                         f"model_parameters given to deepspeed.initialize ({len(missing)} such); pass "
                         "model.parameters(), or set requires_grad=False on the parameters not to train")
    names = dict((id(p), n) for n, p in module.named_parameters(remove_duplicate=False))
    foreign = [p for p in given if id(p) not in planned]
    if foreign:
        where = names.get(id(foreign[0]), f"a tensor of shape {tuple(foreign[0].shape)}")
        raise ValueError(f"model_parameters holds {where!r}, which the model given to deepspeed.initialize does "
                         "not own (or holds twice); pass that model's own parameters")
    return plan, tensors


def check_no_foreign_flags(optimizer: ArchOpt) -> None:
    """DeepSpeed's ZeRO code switches to its own Muon path for parameters tagged ``use_muon``."""
    for group in optimizer.param_groups:
        for fqn, p in zip(group["param_names"], group["params"]):
            if getattr(p, "use_muon", False):
                raise ValueError(f"parameter {fqn!r} carries DeepSpeed's use_muon=True tag, which makes ZeRO run "
                                 "DeepSpeed's own Muon update on it in place of the archopt rule; do not set "
                                 "use_muon on the parameters of a model trained with an archopt optimizer")
