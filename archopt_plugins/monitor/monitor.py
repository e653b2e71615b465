"""``GeometryMonitor``: what one optimizer step did to each parameter, per role and per parameter.

Usage (the HF callback, the recipe reports and TensorBoard all go through ``after_step``)::

    monitor = GeometryMonitor(optimizer, every=10)
    ...
    loss.backward()
    monitor.before_step()          # snapshot (only on measurement steps): weights, gradient norms
    optimizer.step()
    metrics = monitor.after_step()  # {} except every ``every``-th step
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)

Metric names are flat: ``geometry/<role>/<metric>`` per role (``attn_q``, ``mlp_in``, … as in
the plan; ``group<i>`` for a plain torch optimizer), ``geometry/scale_invariant/<metric>`` over
the parameters the plan flags scale-invariant, and ``geometry/param/<fqn>/<metric>`` per
parameter when ``per_param=True``. Measured metrics:

* ``update_rms`` — RMS of the change ΔW of the step;
* ``angular_update`` — angle (radians) between W before and after the step, per scale-invariant
  block when the plan gives blocks (a QK-normed head's rows), averaged over blocks;
* ``effective_lr`` — η/‖w‖² (the group's lr over the squared block norm before the step), the
  step size that matters for a scale-invariant weight; averaged over blocks;
* ``weight_norm`` — ‖W‖ after the step (the norm trajectory);
* ``grad_norm`` — ‖∇W‖ before the step;
* ``relative_update`` — ‖ΔW‖/‖W‖.

Theory predictions are added beside them (``theory.py``: the equilibrium angle and its time scale, the
ℓ∞ and spectral bounds).

Per role, norms combine as root-sum-of-squares (``update_rms`` over all the role's elements,
``grad_norm`` and ``weight_norm`` of the role's tensors together) and the per-parameter ratios
(angles, effective lr, relative update, bounds) are averaged over the role's parameters.

Cost: one copy of the trainable weights and a few reductions, on measurement steps only; nothing
on the others. A step that the optimizer skipped (ArchOpt's ``nonfinite="skip"``) reports nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..roles.types import ParamStructure
from .geometry import block_angles, block_norms, blocks, nanmean
from .theory import TheoryTracker

# How each metric combines across the parameters of one role.
_ROOT_SUM_SQUARE = {"grad_norm", "weight_norm"}


@dataclass
class TrackedParam:
    """One parameter as the monitor sees it: where it lives and what the plan says about it."""

    fqn: str
    param: torch.Tensor
    group: dict[str, Any]
    role: str
    rule: str
    structure: ParamStructure = field(default_factory=ParamStructure)
    scale_invariant: bool = False
    block_rows: int = 0  # rows per scale-invariant block of the matrix view (0: the whole tensor)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer with ``param_groups`` (accelerate and others wrap the real one)."""
    seen = 0
    while not hasattr(optimizer, "plan") and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if not hasattr(optimizer, "param_groups"):
        raise TypeError(f"GeometryMonitor needs a torch.optim.Optimizer (or a wrapper of one with .optimizer), "
                        f"got {type(optimizer).__name__}")
    return optimizer


def tracked_params(optimizer: Any) -> list[TrackedParam]:
    """Every parameter of the optimizer's groups with its role, rule and invariance from the plan."""
    plan = getattr(optimizer, "plan", None)
    entries = {}
    if plan is not None:
        for e in plan.entries:
            for name in (e.fqn, *e.aliases):
                entries[name] = e
    found = []
    for g, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"group{g}.param{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            e = entries.get(name)
            if e is not None:
                found.append(TrackedParam(name, p, group, e.role, e.rule, e.structure, e.scale_invariant,
                                          e.invariant_block_rows))
            else:
                role = group.get("role") or (f"group{g}" if plan is None else ("hidden" if p.ndim >= 2 else "vector"))
                rule = group.get("rule") or type(optimizer).__name__.lower()
                found.append(TrackedParam(name, p, group, role, rule))
    return found


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding all of ``t`` (DTensors are gathered: measurement steps only)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


class GeometryMonitor:
    """Per-step geometry of an optimizer's updates, measured every ``every`` steps.

    ``optimizer``: an ``ArchOpt`` (roles, rules and scale-invariant blocks come from its plan) or
    any ``torch.optim.Optimizer`` (roles are a group's ``"role"`` key, else ``group<i>``).
    ``per_param`` adds one set of metrics per parameter. ``spectral`` enables the power-iteration
    spectral norm (Muon's bound).
    """

    def __init__(self, optimizer: Any, every: int = 1, per_param: bool = False, spectral: bool = True,
                 power_iters: int = 2) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"GeometryMonitor: every must be a positive integer (measure every k-th step), "
                             f"got {every!r}")
        self.optimizer = unwrap_optimizer(optimizer)
        self.every = every
        self.per_param = per_param
        self.theory = TheoryTracker(self.optimizer, spectral=spectral, power_iters=power_iters)
        self.steps_seen = 0  # after_step calls so far
        self._snapshot: dict[int, tuple[TrackedParam, torch.Tensor, float]] | None = None
        self._skipped_before: int | None = None

    def due(self) -> bool:
        """Whether the coming step is a measurement step."""
        return self.steps_seen % self.every == 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Call after backward, before ``optimizer.step()``: snapshot weights and gradient norms."""
        self._snapshot = None
        if not self.due():
            return
        snap = {}
        for t in tracked_params(self.optimizer):
            if t.param.grad is None:
                continue  # the optimizer will not move it
            grad = _local(t.param.grad)
            grad_norm = float(torch.linalg.vector_norm(grad.detach().float()))
            snap[id(t.param)] = (t, _local(t.param).detach().clone(), grad_norm)
        self._snapshot = snap
        self._skipped_before = getattr(self.optimizer, "skipped_steps", None)

    @torch.no_grad()
    def after_step(self) -> dict[str, float]:
        """Call after ``optimizer.step()``: the metrics of this step (``{}`` when not a measurement step)."""
        snap, self._snapshot = self._snapshot, None
        self.steps_seen += 1
        self.theory.advance()
        if not snap:
            return {}
        if self._skipped_before is not None and getattr(self.optimizer, "skipped_steps", 0) > self._skipped_before:
            return {}  # the optimizer skipped this step (non-finite gradient): nothing moved
        per_param: dict[str, dict[str, float]] = {}
        sums: dict[str, dict[str, list[float]]] = {}
        for t, before, grad_norm in snap.values():
            after = _local(t.param).detach()
            m = measure(t, before, after, grad_norm)
            m.update(self.theory.predict(t, after))
            per_param[t.fqn] = m
            for key in {t.role, "scale_invariant"} if t.scale_invariant else {t.role}:
                bucket = sums.setdefault(key, {})
                for name, value in m.items():
                    bucket.setdefault(name, []).append(value)
                bucket.setdefault("_numel", []).append(float(after.numel()))
        out: dict[str, float] = {}
        for key, bucket in sums.items():
            out.update(_aggregate(key, bucket))
        if self.per_param:
            for fqn, m in per_param.items():
                for name, value in m.items():
                    out[f"geometry/param/{fqn}/{name}"] = value
        return out


def measure(t: TrackedParam, before: torch.Tensor, after: torch.Tensor, grad_norm: float) -> dict[str, float]:
    """The measured (not predicted) metrics of one parameter's step."""
    b = blocks(before, t.structure, t.block_rows)
    a = blocks(after, t.structure, t.block_rows)
    delta_norm = float(torch.linalg.vector_norm(a - b))
    before_norm = float(torch.linalg.vector_norm(b))
    norms = block_norms(b)
    lr = float(t.group.get("lr", float("nan")))
    eff = torch.where(norms > 0, lr / norms.clamp_min(1e-30) ** 2, torch.full_like(norms, float("nan")))
    return {
        "update_rms": delta_norm / math.sqrt(max(1, before.numel())),
        "angular_update": nanmean(block_angles(b, a)),
        "effective_lr": nanmean(eff),
        "weight_norm": float(torch.linalg.vector_norm(a)),
        "grad_norm": grad_norm,
        "relative_update": delta_norm / before_norm if before_norm > 0 else float("nan"),
    }


def _aggregate(key: str, bucket: dict[str, list[float]]) -> dict[str, float]:
    numel = bucket.pop("_numel")
    out = {}
    for name, values in bucket.items():
        if name == "update_rms":  # RMS over every element of the role
            total = sum(v * v * n for v, n in zip(values, numel))
            value = math.sqrt(total / max(1.0, sum(numel)))
        elif name in _ROOT_SUM_SQUARE:
            value = math.sqrt(sum(v * v for v in values))
        else:
            finite = [v for v in values if math.isfinite(v)]
            value = sum(finite) / len(finite) if finite else float("nan")
        out[f"geometry/{key}/{name}"] = value
    return out
