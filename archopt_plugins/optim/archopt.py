"""``ArchOpt``: a ``torch.optim.Optimizer`` that runs a Plan.

Follows torch.optim's conventions so schedulers, checkpointing and the stacks treat it like any
optimizer: one param group per (rule, hyperparameters) with ``lr`` that LR schedulers drive,
``param_names`` in every group, state created lazily at a parameter's first step (FSDP2 swaps
params for DTensors after construction), ``step`` stored as a tensor, ``state_dict()`` in torch's
integer-keyed format so ``torch.distributed.checkpoint`` can re-key it by FQN.

Safety: non-finite gradients are caught before any state changes (``nonfinite="skip"`` skips the
whole step and counts it, ``"raise"`` raises naming the parameter); ``load_state_dict`` refuses a
checkpoint of another rule, parameter set or shape, naming the first mismatching parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..planner.names import get_name
from ..planner.plan import Plan, PlanEntry, make_plan
from ..planner.rules import GLOBAL_HPARAMS, get_rule
from ..roles.types import ParamStructure
from ..update.matrix_view import matrix_shape
from ..update.batching import Job, RuleBatch


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf and the optimizer was built with ``nonfinite="raise"``."""


_GROUP_META = ("params", "param_names", "rule", "initial_lr", "skipped_steps") + tuple(GLOBAL_HPARAMS)


def refuse_retired_state(fqn: str, rule: str, keys: Iterable[str]) -> None:
    """Raise, naming the key, when a checkpoint holds state that ``rule`` once kept with another meaning.

    A kernel whose state layout changed lists the old keys in ``retired_state_keys`` (key → what
    changed). Such a checkpoint would be refused without this too (an unknown key here; DCP missing
    the new key), but with a message that blames the model or the hyperparameters, or names only
    the new key.
    """
    retired = get_rule(rule).kernel.retired_state_keys
    for key in keys:
        if key in retired:
            raise ValueError(f"parameter {fqn!r}: checkpoint state {key!r} is from an earlier state layout of "
                             f"rule {rule!r} and cannot be resumed: {retired[key]}")


def _groups_from_plan(plan: Plan, tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One group per distinct (rule, hyperparameters), in order of first appearance — except that the
    groups of the name's own rule come first: trainers and schedulers report ``param_groups[0]["lr"]``
    as "the" learning rate, which should be Muon's under "muon", not the embeddings' AdamW."""
    groups: dict[tuple, dict[str, Any]] = {}
    for entry in plan.entries:
        key = (entry.rule, tuple(sorted(entry.hparams.items())))
        group = groups.get(key)
        if group is None:
            group = {"params": [], "param_names": [], "rule": entry.rule, **entry.hparams, **plan.options,
                     "skipped_steps": 0}
            groups[key] = group
        group["params"].append(tensors[entry.fqn])
        group["param_names"].append(entry.fqn)
    main = get_name(plan.name).main_rule
    return sorted(groups.values(), key=lambda g: g["rule"] != main)


class ArchOpt(torch.optim.Optimizer):
    """Architecture-aware optimizer: each parameter runs the rule its role was planned for.

    ``ArchOpt(model, "muon", lr=0.02, ...)`` plans and builds in one call (``model`` is an
    ``nn.Module``, ``(name, param)`` pairs, or params / param groups); ``ArchOpt.from_plan``
    takes a plan you built and edited yourself. ``optimizer.plan.summary()`` prints the plan.
    """

    def __init__(self, model: Any, name: str = "muon", **hparams: Any) -> None:
        plan, tensors = make_plan(model, name, **hparams)
        self._init_from_plan(plan, tensors)

    @classmethod
    def from_plan(cls, plan: Plan, tensors: dict[str, torch.Tensor]) -> "ArchOpt":
        missing = [e.fqn for e in plan.entries if e.fqn not in tensors]
        if missing:
            raise ValueError(f"no tensor given for planned parameter {missing[0]!r} ({len(missing)} missing)")
        self = cls.__new__(cls)
        self._init_from_plan(plan, tensors)
        return self

    def _init_from_plan(self, plan: Plan, tensors: dict[str, torch.Tensor]) -> None:
        self.plan = plan
        self._entries: dict[str, PlanEntry] = {e.fqn: e for e in plan.entries}
        self.executor = None  # chosen at the first step: LocalExecutor, or the sharding engine
        self.layout_hints: dict = {}  # fqn -> this rank's piece, registered by stack adapters (ZeRO, Megatron)
        super().__init__(_groups_from_plan(plan, tensors), defaults={})

    # -- groups ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Groups come from the plan; a group added later must name its ``rule`` (others are defaulted)."""
        if "rule" not in param_group:
            raise ValueError("ArchOpt param groups need a 'rule' key (one of "
                             f"{sorted(r for r in ('muon', 'adamw'))}); build the optimizer from the model "
                             "so the plan assigns rules, or add {'params': [...], 'rule': 'adamw'}")
        rule = get_rule(param_group["rule"], "add_param_group")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = list(param_group.get("param_names") or
                     [f"added{len(self.param_groups)}.param{i}" for i in range(len(params))])
        given = {k: v for k, v in param_group.items() if k not in _GROUP_META}
        hparams = rule.convert({**rule.defaults(), **given}, f"param group of rule {rule.name!r}")
        group = {"params": params, "param_names": names, "rule": rule.name, **hparams,
                 **{k: param_group.get(k, h.default) for k, h in GLOBAL_HPARAMS.items()},
                 "skipped_steps": param_group.get("skipped_steps", 0)}
        for name, p in zip(names, params):
            if name not in self._entries:
                if p.ndim < rule.min_ndim:
                    raise ValueError(f"parameter {name!r}: rule {rule.name!r} needs >= {rule.min_ndim} "
                                     f"dimensions, got shape {tuple(p.shape)}")
                self._entries[name] = PlanEntry(name, tuple(p.shape), "hidden" if p.ndim >= 2 else "vector",
                                                rule.name, dict(hparams), False, ParamStructure())
        super().add_param_group(group)

    def register_layout_hints(self, hints: dict) -> None:
        """Adapters (ZeRO, Megatron) tell the engine which piece of each parameter this rank holds.

        ``hints`` maps an FQN to a ``shard.layout.Block`` or ``FlatRange`` in the complete tensor's
        coordinates. Must be called before the first step (layouts are discovered then).
        """
        if self.executor is not None:
            raise RuntimeError("register_layout_hints must be called before the first optimizer step")
        unknown = [f for f in hints if f not in self._entries]
        if unknown:
            raise ValueError(f"layout hint for unknown parameter {unknown[0]!r}")
        self.layout_hints.update(hints)

    @property
    def comm_stats(self):
        """Communication of the sharding engine: ``(last step, total)`` CommStats, or None when local."""
        executor = self.executor
        if executor is None or not getattr(executor, "distributed", False):
            return None
        return executor.last_stats, executor.total_stats

    @property
    def skipped_steps(self) -> int:
        """How many steps ``nonfinite="skip"`` has skipped."""
        return max((g.get("skipped_steps", 0) for g in self.param_groups), default=0)

    # -- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, name, p, p, p.grad) for g in self.param_groups
                for name, p in zip(g["param_names"], g["params"]) if p.grad is not None]
        self._run(work)
        return loss

    @torch.no_grad()
    def step_pieces(self, pieces: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One step on pieces of parameters that a stack keeps outside ``param_groups``.

        For adapters whose stack steps flat buffers (ZeRO partitions, Megatron's distributed
        optimizer): ``pieces`` maps every planned FQN to this rank's (param piece, grad piece) —
        views into the stack's buffers, empty tensors where this rank holds nothing — and the layout
        hints registered with :meth:`register_layout_hints` say where each piece sits. State is
        kept per parameter (shaped like the piece) under the planned parameter's key.
        """
        missing = [fqn for fqn in self._entries if fqn not in pieces]
        if missing:
            raise ValueError(f"step_pieces needs a (param, grad) piece for every planned parameter (empty tensors "
                             f"where this rank holds none); missing {missing[0]!r} and {len(missing) - 1} more")
        work = [(g, name, p, *pieces[name]) for g in self.param_groups
                for name, p in zip(g["param_names"], g["params"])]
        self._run(work)

    def _run(self, work: list[tuple[dict[str, Any], str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """work: (group, fqn, state key, param or its piece, grad or its piece)."""
        executor = self._executor_for_step()
        bad = executor.first_nonfinite([w[1] for w in work], [w[4] for w in work])
        if bad is not None:
            group, fqn = work[bad][0], work[bad][1]
            if group["nonfinite"] == "raise":
                raise NonFiniteGradientError(
                    f"parameter {fqn!r} has a non-finite gradient (NaN or Inf); no state was changed. "
                    "Lower the learning rate or use loss scaling, or pass nonfinite='skip' to skip such steps")
            for g in self.param_groups:
                g["skipped_steps"] = g.get("skipped_steps", 0) + 1
            return
        batches: dict[int, RuleBatch] = {}
        for group, name, key, param, grad in work:
            if grad.is_sparse:
                raise ValueError(f"parameter {name!r}: sparse gradients are not supported")
            rule = get_rule(group["rule"])
            hp = {k: group[k] for k in rule.hparams}
            state = self.state[key]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state.update(rule.kernel.init_state(param, hp))
            state["step"] += 1
            entry = self._entries[name]
            batch = batches.setdefault(id(group), RuleBatch(rule.name, rule.kernel, []))
            batch.jobs.append(Job(name, param, grad, state, hp, entry.structure, entry.shape))
        executor.run(list(batches.values()))

    def _executor_for_step(self):
        """The executor, chosen at the first step (FSDP2 swaps params for DTensors after construction)."""
        if self.executor is None:
            from ..shard.executor import choose_executor

            self.executor = choose_executor(self)
        return self.executor

    # -- checkpoints ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint after checking it belongs to this plan (same rules, names, shapes)."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}: it was saved from another plan "
                             f"(groups here: {[g['rule'] for g in self.param_groups]})")
        for saved, group in zip(saved_groups, self.param_groups):
            names = saved.get("param_names")
            if names is not None and list(names) != list(group["param_names"]):
                for i, (a, b) in enumerate(zip(names, group["param_names"])):
                    if a != b:
                        raise ValueError(f"checkpoint parameter {a!r} is at the place of {b!r} here: "
                                         "it was saved from another parameter set or plan")
                raise ValueError(f"checkpoint group of rule {saved.get('rule')!r} has {len(names)} parameters, "
                                 f"this one {len(group['param_names'])} (first: {group['param_names'][0]!r})")
            first = group["param_names"][0]
            if saved.get("rule") != group["rule"]:
                raise ValueError(f"parameter {first!r}: checkpoint has rule {saved.get('rule')!r}, "
                                 f"this optimizer {group['rule']!r}")
            kernel = get_rule(group["rule"]).kernel
            hp = {k: group[k] for k in get_rule(group["rule"]).hparams}
            for index, name, p in zip(saved["params"], group["param_names"], group["params"]):
                entry = self._entries[name]
                mshape = matrix_shape(entry.shape, entry.structure) if len(entry.shape) >= 2 else None
                expected = kernel.state_shapes(tuple(p.shape), mshape, hp)
                saved_state = state_dict.get("state", {}).get(index, {})
                refuse_retired_state(name, group["rule"], saved_state)
                for key, value in saved_state.items():
                    if key == "step" or not isinstance(value, torch.Tensor):
                        continue
                    wrong_shape = key in expected and tuple(value.shape) != expected[key]
                    if wrong_shape or (key not in expected and kernel.state_shapes_complete):
                        raise ValueError(f"parameter {name!r}: checkpoint state {key!r} has shape "
                                         f"{tuple(value.shape)}, but rule {group['rule']!r} keeps "
                                         f"{expected.get(key, 'no such state')} for the parameter {tuple(p.shape)} "
                                         "here: saved from another model or with other hyperparameters")
        super().load_state_dict(state_dict)
        # torch casts floating-point state to its parameter's dtype on load; ArchOpt keeps float32
        # state for low-precision parameters (update.kernel.state_dtype), so a bf16 model's moments
        # would silently continue in bf16. Restore the dtypes the checkpoint was saved with.
        saved_state = state_dict.get("state", {})
        for saved, group in zip(saved_groups, self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                state = self.state.get(p, {})
                for key, value in saved_state.get(index, {}).items():
                    loaded = state.get(key)
                    if (isinstance(value, torch.Tensor) and isinstance(loaded, torch.Tensor)
                            and value.is_floating_point() and loaded.dtype != value.dtype):
                        state[key] = loaded.to(value.dtype)
