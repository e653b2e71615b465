"""``DeepSpeedArchOpt``: the ArchOpt DeepSpeed builds for an ``"ArchOpt<Name>"`` ds_config entry.

After DeepSpeed wraps it (``attach``), it runs in one of two modes:

* **whole parameters** — ZeRO stage 0, fp32 (DeepSpeed steps it directly) or bf16/fp16 (the
  wrapper hands it fp32 master copies of the same shapes): ArchOpt's own step; with more than one
  rank the sharding engine sees replicas and gives each matrix one owner;
* **fragments** — ZeRO-1/2/3 (``DeepSpeedZeroOptimizer``, ``BF16_Optimizer``,
  ``DeepSpeedZeroOptimizer_Stage3``): DeepSpeed's flat partitions are mapped back to every
  parameter's piece (``fragments.py``), registered as the engine's flat-fragment layout, and all
  pieces step together through ``ArchOpt.step_pieces``.

State is kept per planned parameter (the model's own parameter object is the key), shaped like this
rank's piece; whole-matrix state (Shampoo/SOAP factors) lives on the matrix's owner rank. The
torch-format ``state_dict()`` DeepSpeed saves in its checkpoints holds this rank's pieces and owned
matrices with the piece ranges they belong to; ``load_state_dict`` restores them bit for bit at the
same world size and partitioning, and refuses another partitioning, naming the parameter (continue
at another world size with ``checkpoint.save_resharded`` / ``load_resharded``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from archopt_plugins.optim.archopt import ArchOpt
from archopt_plugins.planner.plan import Plan

from .fragments import FragmentBridge, bf16_units, zero12_units, zero3_units


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DeepSpeedArchOpt(ArchOpt):
    """An ArchOpt that follows DeepSpeed's ZeRO partitions (built by the adapter, not by hand)."""

    @classmethod
    def from_plan(cls, plan: Plan, tensors: dict[str, torch.Tensor]) -> "DeepSpeedArchOpt":
        return super().from_plan(plan, tensors)  # type: ignore[return-value]

    def _init_from_plan(self, plan: Plan, tensors: dict[str, torch.Tensor]) -> None:
        super()._init_from_plan(plan, tensors)
        self.bridge: FragmentBridge | None = None
        self.zero_wrapper: str = "none"
        self._groups = list(self.param_groups)
        self._planned_lists = [list(g["params"]) for g in self.param_groups]

    # -- after deepspeed.initialize wraps us ----------------------------------------------------------
    def attach(self, wrapper: Any) -> None:
        """Read the wrapper DeepSpeed put around this optimizer and map its partitions (once)."""
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self._groups = list(self.param_groups)
        if len(self._groups) != len(self._planned_lists):
            raise RuntimeError(f"DeepSpeed kept {len(self._groups)} of the optimizer's {len(self._planned_lists)} "
                               "param groups; the archopt adapter needs all of them")
        self.zero_wrapper = type(wrapper).__name__
        names = {id(p): fqn for g, params in zip(self._groups, self._planned_lists)
                 for fqn, p in zip(g["param_names"], params)}
        if wrapper is self or isinstance(wrapper, FP16_UnfusedOptimizer):
            return  # whole parameters (the fp16/bf16 wrapper hands fp32 copies of the same shapes)
        if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
            units = zero3_units(wrapper, names)
        elif isinstance(wrapper, DeepSpeedZeroOptimizer):
            units = zero12_units(wrapper, names)
        elif isinstance(wrapper, BF16_Optimizer):
            units = bf16_units(wrapper, names)
        else:
            raise ValueError(f"DeepSpeed wrapped the archopt optimizer in {type(wrapper).__name__}, whose partitions "
                             "the adapter cannot map to parameters; supported: ZeRO stages 0-3 "
                             "(DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer)")
        numels = {e.fqn: e.numel for e in self.plan.entries}
        self.bridge = FragmentBridge(wrapper, units, list(names.values()), numels)
        self.register_layout_hints(dict(self.bridge.ranges))

    @contextmanager
    def planned_view(self) -> Iterator[None]:
        """Within the block ``param_groups`` hold the planned parameters again (DeepSpeed swaps them)."""
        current = self.param_groups
        saved = [g["params"] for g in self._groups]
        self.param_groups = self._groups
        for group, params in zip(self._groups, self._planned_lists):
            group["params"] = params
        try:
            yield
        finally:
            for group, params in zip(self._groups, saved):
                group["params"] = params
            self.param_groups = current

    # -- step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.bridge is None:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [p for g in self.param_groups for p in g["params"]]
        if self.bridge.collect(stepped):
            pieces = self.bridge.pieces()
            with self.planned_view():
                self.step_pieces(pieces)
            self.bridge.finish(stepped)
        return loss

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.bridge is None:
            state = super().state_dict()
            if _distributed():
                _share_owner_state(self, state)
            return state
        with self.planned_view():
            index, groups = 0, []
            ids: dict[int, int] = {}
            for group in self.param_groups:
                packed = {k: v for k, v in group.items() if k != "params"}
                packed["params"] = list(range(index, index + len(group["params"])))
                for p in group["params"]:
                    ids[id(p)] = index
                    index += 1
                groups.append(packed)
            state = {ids[id(k)]: v for k, v in self.state.items() if id(k) in ids}
        return {"state": state, "param_groups": groups, "archopt_zero": self.zero_wrapper,
                "archopt_pieces": {f: (r.start, r.stop) for f, r in self.bridge.ranges.items()},
                "archopt_world_size": dist.get_world_size() if dist.is_initialized() else 1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.bridge is None:
            if "archopt_pieces" in state_dict:
                raise ValueError("this checkpoint holds ZeRO-1/2/3 pieces, but this run uses ZeRO stage 0; keep the "
                                 "stage, or continue through checkpoint.save_resharded / load_resharded")
            super().load_state_dict(state_dict)
            return
        saved_pieces = state_dict.get("archopt_pieces")
        if saved_pieces is None:
            raise ValueError("this checkpoint was saved without ZeRO partitions (ZeRO stage 0), but this run uses "
                             f"{self.zero_wrapper}; keep the stage, or continue through "
                             "checkpoint.save_resharded / load_resharded")
        for fqn, piece in self.bridge.ranges.items():
            old = tuple(saved_pieces.get(fqn, (-1, -1)))
            if old != (piece.start, piece.stop):
                raise ValueError(
                    f"parameter {fqn!r}: this rank's checkpoint holds its elements {old[0]}:{old[1]}, this run "
                    f"partitions it as {piece.start}:{piece.stop} (saved at world size "
                    f"{state_dict.get('archopt_world_size')}); DeepSpeed checkpoints of an archopt optimizer load at "
                    "the same world size and ZeRO settings. To continue at another world size, save with "
                    "archopt_plugins.integrations.deepspeed.save_resharded and load with load_resharded")
        saved_groups = state_dict["param_groups"]
        if [g["param_names"] for g in saved_groups] != [g["param_names"] for g in self._groups]:
            raise ValueError("checkpoint parameter groups differ from this optimizer's (another model, name or "
                             f"overrides): groups here {[g['rule'] for g in self._groups]}, saved "
                             f"{[g.get('rule') for g in saved_groups]}")
        for saved, group in zip(saved_groups, self._groups):
            if saved.get("rule") != group["rule"]:
                raise ValueError(f"parameter {group['param_names'][0]!r}: checkpoint has rule {saved.get('rule')!r}, "
                                 f"this optimizer {group['rule']!r}")
            group.update({k: v for k, v in saved.items() if k != "params"})
        planned = [p for params in self._planned_lists for p in params]
        device = self.bridge.units[0].flat.device if self.bridge.units else torch.device("cpu")
        self.state.clear()
        for index, values in state_dict["state"].items():
            key = planned[int(index)]
            self.state[key] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def _share_owner_state(optimizer: ArchOpt, state: dict[str, Any]) -> None:
    """ZeRO-0 saves rank 0's optimizer state only: give it the whole-matrix state other ranks own.

    DeepSpeed computes the state dict on every rank (then rank 0 writes it), so this all-gather is
    collective. Elementwise state is identical on every replica; owner state (Shampoo/SOAP factors)
    exists on the matrix's owner only and is copied into every rank's dict.
    """
    executor = optimizer.executor
    owners = getattr(executor, "owners", {}) if executor is not None else {}
    rank = dist.get_rank()
    index = {fqn: i for i, fqn in enumerate(n for g in optimizer.param_groups for n in g["param_names"])}
    mine = {}
    for fqn, owner in owners.items():
        if owner == rank and index[fqn] in state["state"]:
            mine[index[fqn]] = dict(state["state"][index[fqn]])
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for theirs in everyone:
        for i, entry in theirs.items():  # new dicts: the packed state shares its dicts with the live state
            state["state"][i] = {**entry, **state["state"].get(i, {})}
