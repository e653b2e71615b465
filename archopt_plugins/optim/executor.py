"""Running one step of the rules over the parameters a process holds.

The optimizer hands over, per rule and hyperparameter group, the parameters that have gradients
with their state; this module runs the rule's kernel on them. Elementwise rules run as one
foreach call per group. Whole-matrix rules run prepare → transform → apply, with ``transform``
batched over every matrix of the same shape and transform settings across all groups, so a
model's 4·L same-shape attention matrices cost one batched Newton–Schulz.

``LocalExecutor`` assumes every parameter is complete in this process (single process, DDP).
The sharding engine (``shard/``) provides an executor with the same interface that gathers pieces
to owners before ``transform``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..planner.rules import RuleSpec
from ..update.kernel import ElementwiseKernel, MatrixBatch, MatrixKernel, Segment
from ..update.matrix_view import from_matrices, matrix_shape, to_matrices
from ..roles.types import ParamStructure


@dataclass
class Job:
    """One parameter's work this step."""

    fqn: str
    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, torch.Tensor]
    hp: dict[str, Any]
    structure: ParamStructure


@dataclass
class RuleBatch:
    """The jobs of one param group: one rule, one set of hyperparameters."""

    rule: RuleSpec
    jobs: list[Job]


class LocalExecutor:
    """Every parameter is whole in this process."""

    def run(self, batches: list[RuleBatch]) -> None:
        matrix_batches = []
        for batch in batches:
            if isinstance(batch.rule.kernel, ElementwiseKernel):
                hp = batch.jobs[0].hp
                batch.rule.kernel.step([j.param for j in batch.jobs], [j.grad for j in batch.jobs],
                                       [j.state for j in batch.jobs], hp)
            elif isinstance(batch.rule.kernel, MatrixKernel):
                matrix_batches.append(batch)
            else:
                raise TypeError(f"rule {batch.rule.name!r} has a kernel of unsupported kind {batch.rule.needs!r}")
        if matrix_batches:
            self._run_matrix(matrix_batches)

    def _run_matrix(self, batches: list[RuleBatch]) -> None:
        # prepare: elementwise, per parameter
        prepared: list[tuple[RuleBatch, Job, torch.Tensor]] = []
        for batch in batches:
            kernel = batch.rule.kernel
            for job in batch.jobs:
                prepared.append((batch, job, kernel.prepare(job.param, job.grad, job.state, job.hp)))
        # transform: bucket same-shape matrices with the same transform settings, one call each
        buckets: dict[tuple, list[int]] = {}
        views = []
        for index, (batch, job, tensor) in enumerate(prepared):
            mats = to_matrices(tensor, job.structure)
            views.append(mats)
            kernel = batch.rule.kernel
            key = (batch.rule.name, tuple(mats.shape[1:]), tensor.device, tensor.dtype,
                   tuple(job.hp[k] for k in kernel.transform_keys))
            buckets.setdefault(key, []).append(index)
        results: list[torch.Tensor | None] = [None] * len(prepared)
        for indices in buckets.values():
            batch, job, _ = prepared[indices[0]]
            data = torch.cat([views[i] for i in indices], dim=0) if len(indices) > 1 else views[indices[0]]
            # In one process the parameter's own state doubles as its owner state.
            segments = [Segment(prepared[i][1].fqn, views[i].shape[0], prepared[i][1].state,
                                int(prepared[i][1].state["step"])) for i in indices]
            matrix_batch = MatrixBatch(data, segments)
            for i, piece in zip(indices, matrix_batch.split(batch.rule.kernel.transform(matrix_batch, job.hp))):
                results[i] = piece
        # apply: elementwise, per parameter, with the per-matrix shape for lr scaling
        for (batch, job, tensor), out in zip(prepared, results):
            _, fan_out, fan_in = matrix_shape(job.param.shape, job.structure)
            update = from_matrices(out, job.structure, job.param.shape)
            batch.rule.kernel.apply(job.param, update, job.state, job.hp, fan_out, fan_in)
