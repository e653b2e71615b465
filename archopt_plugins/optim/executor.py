"""Running one step of the rules when every parameter is complete in this process.

The optimizer hands over, per param group, the parameters that have gradients with their state
(``update.batching.RuleBatch``). Elementwise rules run as one foreach call per group; whole-matrix
rules run prepare → transform → apply, with ``transform`` batched over every matrix of the same
shape and transform settings across all groups (``update.batching.transform_complete``).

The sharding engine (``shard.executor.ShardedExecutor``) has the same interface and gathers the
pieces of each matrix to an owner rank before ``transform``.
"""

from __future__ import annotations

import torch

from ..update.batching import Complete, RuleBatch, transform_complete
from ..update.finite import first_nonfinite_index
from ..update.kernel import ElementwiseKernel, MatrixKernel
from ..update.matrix_view import matrix_shape


class LocalExecutor:
    """Every parameter is whole in this process (single process, or each DDP rank redundantly)."""

    distributed = False

    def first_nonfinite(self, names: list[str], grads: list[torch.Tensor]) -> int | None:
        """Index of the first gradient holding NaN/Inf, or None (one device sync)."""
        return first_nonfinite_index(grads)

    def run(self, batches: list[RuleBatch]) -> None:
        matrix_batches = []
        for batch in batches:
            if isinstance(batch.kernel, ElementwiseKernel):
                batch.kernel.step([j.param for j in batch.jobs], [j.grad for j in batch.jobs],
                                  [j.state for j in batch.jobs], batch.jobs[0].hp)
            elif isinstance(batch.kernel, MatrixKernel):
                matrix_batches.append(batch)
            else:
                raise TypeError(f"rule {batch.rule!r} has a kernel of unsupported kind {batch.kernel.needs!r}")
        if not matrix_batches:
            return
        # In one process the parameter's own state doubles as its owner state.
        items, jobs = [], []
        for batch in matrix_batches:
            for job in batch.jobs:
                direction = batch.kernel.prepare(job.param, job.grad, job.state, job.hp)
                param = job.param if batch.kernel.transform_needs_param else None
                items.append(Complete(job.fqn, batch.kernel, batch.rule, direction, job.structure, job.hp,
                                      job.state, int(job.state["step"]), param))
                jobs.append((batch, job))
        for (batch, job), update in zip(jobs, transform_complete(items)):
            _, fan_out, fan_in = matrix_shape(job.shape, job.structure)
            batch.kernel.apply(job.param, update, job.state, job.hp, fan_out, fan_in)
