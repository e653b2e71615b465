"""The sharding engine: exact whole-matrix updates when parameters are split across ranks.

Per step (DESIGN.md, "The sharding idea"):

1. elementwise work runs on the local piece as it is (AdamW, momentum, weight decay);
2. each whole-matrix parameter has one owner (``owners``); its pieces travel to the owner in one
   batched all-to-all (``transport``), the owner runs the rule's ``transform`` on the complete
   matrix (batched by shape with everything else it owns), and the update travels back the same
   way to every rank holding a piece. State that lives with the complete matrix (Shampoo factors)
   is kept in the parameter's optimizer state on its owner only, under the same keys a single
   process uses, so checkpoints re-key it by FQN and another world size re-places it;
3. the local piece applies its part of the update.

Layouts are discovered at the first step (``discover``), because the HF Trainer and accelerate
build the optimizer before FSDP2 swaps parameters for DTensors. Modes (the ``sharding`` option):
``"exact"`` (default when distributed), ``"redundant"`` (every rank assembles and computes every
matrix: the peers' way, kept as a baseline), ``"blockwise"`` (each local block treated as a
complete matrix: inexact, only when asked for by name; ``tests/distributed`` measures how far off).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..roles.types import ParamStructure
from ..update.batching import Complete, RuleBatch, transform_complete
from ..update.finite import first_nonfinite_index
from ..update.kernel import ElementwiseKernel, Kernel, MatrixBatch, MatrixKernel, Segment, resolve_dtype
from ..update.matrix_view import matrix_shape
from .discover import _is_dtensor, discover_layouts, local_tensor
from .experts import expert_name, held_experts, join_experts, split_by_expert, take_expert
from .layout import Block, ParamLayout, Piece
from .owners import Unit, assign_owners, check_identical
from .transport import CommPlan, CommStats, build_plan, gather, scatter_back

SHARDING_MODES = ("auto", "exact", "redundant", "blockwise")


@dataclass(frozen=True)
class ParamInfo:
    fqn: str
    tensor: torch.Tensor
    shape: tuple[int, ...]
    structure: ParamStructure
    kernel: Kernel


def _local_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


class ShardedExecutor:
    distributed = True

    def __init__(self, params: Callable[[], list[ParamInfo]], mode: str = "exact", comm_dtype: str = "auto",
                 hints: dict[str, Piece] | None = None, group: Any = None) -> None:
        if mode not in SHARDING_MODES:
            raise ValueError(f"sharding must be one of {list(SHARDING_MODES)}, got {mode!r}")
        self.mode = "exact" if mode == "auto" else mode
        self.comm_dtype = comm_dtype
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._params = params
        self.hints = dict(hints or {})
        self.layouts: dict[str, ParamLayout] | None = None
        self.owners: dict[str, int] = {}
        self.costs: dict[str, float] = {}
        self.splits: dict[str, list[ParamLayout]] = {}  # MoE weights with one owner per expert (experts.py)
        self._plans: dict[tuple[str, ...], CommPlan] = {}
        self.last_stats = CommStats()
        self.total_stats = CommStats()
        self.last_transform_seconds = 0.0

    # -- set-up at the first step ------------------------------------------------------------------
    def _setup(self) -> None:
        infos = self._params()
        self.layouts = discover_layouts([(i.fqn, i.tensor, i.shape) for i in infos], self.hints, self.group)
        units = []
        for info in infos:
            if isinstance(info.kernel, MatrixKernel) and info.kernel.needs != "elementwise":
                b, m, n = matrix_shape(info.shape, info.structure)
                parts = split_by_expert(self.layouts[info.fqn]) if self._splittable(info, b) else None
                if parts:  # one unit per expert, each with its own layout
                    self.splits[info.fqn] = parts
                    self.layouts.update({part.fqn: part for part in parts})
                for layout in parts or [self.layouts[info.fqn]]:
                    self.costs[layout.fqn] = info.kernel.cost(1 if parts else b, m, n)
                    units.append(Unit(layout.fqn, self.costs[layout.fqn], tuple(layout.full_holders())))
        self.owners = assign_owners(units, self.world)
        check_identical(self.owners, self.group)

    def _splittable(self, info: ParamInfo, matrices: int) -> bool:
        """A [E, ...] MoE weight whose rule lets each expert have its own owner (experts.py)."""
        kernel = info.kernel
        return (self.mode == "exact" and kernel.splits_by_matrix
                and not kernel.transform_needs_param and info.structure.batch_dims == 1
                and matrices == info.shape[0] > 1)

    def _plan_for(self, fqns: tuple[str, ...]) -> CommPlan:
        plan = self._plans.get(fqns)
        if plan is None:
            assert self.layouts is not None
            plan = build_plan([self.layouts[f] for f in fqns], self.owners, self.rank, self.world,
                              redundant=self.mode == "redundant")
            self._plans[fqns] = plan
        return plan

    # -- the step ---------------------------------------------------------------------------------
    def first_nonfinite(self, names: list[str], grads: list[torch.Tensor]) -> int | None:
        """Index of the first non-finite gradient on any rank; also checks ranks step the same set."""
        bad = len(grads)
        locals_ = [local_tensor(g) for g in grads]
        nonempty = [(i, g) for i, g in enumerate(locals_) if g.numel()]
        found = first_nonfinite_index([g for _, g in nonempty])  # one sum per tensor (update/finite.py)
        if found is not None:
            bad = nonempty[found][0]
        signature = float(zlib.crc32("\n".join(names).encode()))
        flags = torch.tensor([bad, signature, -signature], dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        self.last_stats = CommStats(collectives=1)
        if flags[1].item() != -flags[2].item():
            raise RuntimeError("ranks step different sets of parameters (some have gradients where others have "
                               "none); every rank must run the same model and backward")
        first = int(flags[0].item())
        return None if first >= len(grads) else first

    def run(self, batches: list[RuleBatch]) -> None:
        if self.layouts is None:
            self._setup()
        stats = self.last_stats  # continues the nonfinite check's count
        matrix_batches = []
        for batch in batches:
            if isinstance(batch.kernel, ElementwiseKernel):
                states = [_local_state(j.state) for j in batch.jobs]
                batch.kernel.step([local_tensor(j.param) for j in batch.jobs],
                                  [local_tensor(j.grad) for j in batch.jobs], states, batch.jobs[0].hp)
            elif isinstance(batch.kernel, MatrixKernel):
                matrix_batches.append(batch)
            else:
                raise TypeError(f"rule {batch.rule!r} has a kernel of unsupported kind {batch.kernel.needs!r}")
        if matrix_batches:
            self._run_matrix(matrix_batches, stats)
        self.total_stats.add(stats)

    def _run_matrix(self, batches: list[RuleBatch], stats: CommStats) -> None:
        jobs, directions, local_states = [], {}, {}
        for batch in batches:
            for job in batch.jobs:
                state = _local_state(job.state)
                directions[job.fqn] = batch.kernel.prepare(local_tensor(job.param), local_tensor(job.grad), state,
                                                          job.hp)
                local_states[job.fqn] = state
                jobs.append((batch, job))
        # A matrix kernel that declares needs="elementwise" (Scion's sign LMO) transforms each element
        # alone and only reads fan_in in apply: it runs on the local piece, nothing is gathered.
        on_piece = [(b, j) for b, j in jobs if b.kernel.needs == "elementwise"]
        gathered = [(b, j) for b, j in jobs if b.kernel.needs != "elementwise"]
        updates = self._on_piece(on_piece, directions)
        if gathered and self.mode == "blockwise":
            updates.update(self._blockwise(gathered, directions))
        elif gathered:
            updates.update(self._exact(gathered, directions, stats))
        for batch, job in jobs:
            _, fan_out, fan_in = matrix_shape(job.shape, job.structure)
            if job.fqn in updates:
                batch.kernel.apply(local_tensor(job.param), updates[job.fqn], local_states[job.fqn], job.hp,
                                   fan_out, fan_in)

    def _exact(self, jobs, directions: dict[str, torch.Tensor], stats: CommStats) -> dict[str, torch.Tensor]:
        assert self.layouts is not None
        fqns = tuple(job.fqn for _, job in jobs)
        real_shapes = {fqn: directions[fqn].shape for fqn in fqns}
        device = directions[fqns[0]].device  # every parameter has a (possibly empty) local direction
        units, parent, directions = self._units(fqns, directions)
        plan = self._plan_for(units)
        dtype = resolve_dtype(self.comm_dtype, device)
        complete = gather(plan, self.layouts, directions, dtype, self.group, stats)
        by_fqn = {job.fqn: (batch, job) for batch, job in jobs}
        by_fqn.update({unit: by_fqn[fqn] for unit, fqn in parent.items()})
        # Kernels that read W itself on the owner get the parameters gathered too (full precision).
        wanting = tuple(f for f in fqns if by_fqn[f][0].kernel.transform_needs_param)
        values = {}
        if wanting:
            pieces = {f: local_tensor(by_fqn[f][1].param) for f in wanting}
            values = gather(self._plan_for(wanting), self.layouts, pieces, torch.float32, self.group, stats)
        items = []
        for fqn in plan.computes:
            batch, job = by_fqn[fqn]
            items.append(Complete(fqn, batch.kernel, batch.rule, complete[fqn], job.structure, job.hp,
                                  job.state, int(job.state["step"]), values.get(fqn)))
        start = time.perf_counter()
        results = dict(zip(plan.computes, transform_complete(items)))
        self.last_transform_seconds = time.perf_counter() - start
        shapes = {fqn: d.shape for fqn, d in directions.items()}
        updates = scatter_back(plan, self.layouts, results, shapes, dtype, self.group, stats)
        return self._join(fqns, updates, {**shapes, **real_shapes})

    def _units(self, fqns: tuple[str, ...], directions: dict[str, torch.Tensor]):
        """The engine's units for ``fqns`` (a split MoE weight becomes its experts), which parameter
        each expert unit belongs to, and the local directions keyed by unit."""
        units, parent, local = [], {}, {}
        for fqn in fqns:
            if fqn not in self.splits:
                units.append(fqn)
                if fqn in directions:
                    local[fqn] = directions[fqn]
                continue
            layout = self.layouts[fqn]
            inner, piece = tuple(layout.shape[1:]), layout.pieces[self.rank]
            for part in self.splits[fqn]:
                units.append(part.fqn)
                parent[part.fqn] = fqn
            for e in held_experts(piece, layout.shape[0], inner):
                local[expert_name(fqn, e)] = take_expert(directions[fqn], piece, e, inner)
        return tuple(units), parent, local

    def _join(self, fqns: tuple[str, ...], updates: dict[str, torch.Tensor],
              shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        """Per-parameter local updates, the experts of a split weight put back together."""
        for fqn in fqns:
            if fqn in self.splits:
                layout = self.layouts[fqn]
                piece = layout.pieces[self.rank]
                held = held_experts(piece, layout.shape[0], tuple(layout.shape[1:]))
                parts = [updates.pop(expert_name(fqn, e)) for e in held]
                if parts:
                    updates[fqn] = join_experts(parts, piece, shapes[fqn])
        return updates

    @staticmethod
    def _on_piece(jobs, directions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        updates = {}
        for batch, job in jobs:
            d = directions[job.fqn]
            segment = Segment(job.fqn, 1, job.state, int(job.state["step"]))
            # the transform is elementwise, so any shape of batch works: the piece as one flat "matrix"
            flat = MatrixBatch(d.reshape(1, 1, -1), [segment])
            updates[job.fqn] = batch.kernel.transform(flat, job.hp).reshape(d.shape)
        return updates

    def _blockwise(self, jobs, directions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.layouts is not None
        items, names = [], []
        for batch, job in jobs:
            piece = self.layouts[job.fqn].pieces[self.rank]
            if piece is None or piece.numel == 0:
                continue
            if not isinstance(piece, Block):
                raise ValueError(f"parameter {job.fqn!r}: sharding='blockwise' needs block-shaped shards, but this "
                                 f"rank holds a flat fragment {piece.describe()}; use sharding='exact'")
            param = local_tensor(job.param) if batch.kernel.transform_needs_param else None
            items.append(Complete(job.fqn, batch.kernel, batch.rule, directions[job.fqn], job.structure, job.hp,
                                  job.state, int(job.state["step"]), param))
            names.append(job.fqn)
        start = time.perf_counter()
        results = transform_complete(items)
        self.last_transform_seconds = time.perf_counter() - start
        return dict(zip(names, results))


def choose_executor(optimizer: Any):
    """The executor for an ArchOpt: the sharding engine when distributed or given DTensors, else local."""
    from ..optim.executor import LocalExecutor
    from ..planner.rules import get_rule

    groups = optimizer.param_groups
    mode = groups[0].get("sharding", "auto") if groups else "auto"
    has_dtensor = any(_is_dtensor(p) for g in groups for p in g["params"])
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    hints = getattr(optimizer, "layout_hints", {})
    if not (distributed or has_dtensor or hints):
        return LocalExecutor()
    if not dist.is_initialized():
        raise RuntimeError("DTensor parameters or fragment hints need torch.distributed to be initialized")

    def params() -> list[ParamInfo]:
        out = []
        for g in optimizer.param_groups:
            kernel = get_rule(g["rule"]).kernel
            for name, p in zip(g["param_names"], g["params"]):
                entry = optimizer._entries[name]
                out.append(ParamInfo(name, p, entry.shape, entry.structure, kernel))
        return out

    return ShardedExecutor(params, mode, groups[0].get("comm_dtype", "auto") if groups else "auto", hints)
