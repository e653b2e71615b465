"""Units of work for one optimizer step, and the batched whole-matrix transform every executor shares.

An executor (one process: ``optim.executor.LocalExecutor``; sharded: ``shard.executor``) turns
the optimizer's parameters into :class:`Job` s grouped in :class:`RuleBatch` es. Whole-matrix
rules then need ``transform`` run on complete tensors; :func:`transform_complete` buckets those
tensors by (rule, matrix shape, device, dtype, transform settings) so each bucket is one batched
call — a model's 4·L same-shape attention matrices cost one batched Newton–Schulz — and returns
each tensor's update in its stored shape. Pure tensor code: no torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..roles.types import ParamStructure
from .kernel import Kernel, MatrixBatch, MatrixKernel, Segment
from .matrix_view import from_matrices, to_matrices


@dataclass
class Job:
    """One parameter's work this step (``param``/``grad`` may be DTensors or local pieces)."""

    fqn: str
    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, torch.Tensor]
    hp: dict[str, Any]
    structure: ParamStructure
    shape: tuple[int, ...]  # the parameter's complete (global) shape


@dataclass
class RuleBatch:
    """The jobs of one param group: one rule, one set of hyperparameters."""

    rule: str
    kernel: Kernel
    jobs: list[Job]


@dataclass
class Complete:
    """A complete tensor (in stored layout) whose matrices need ``kernel.transform``."""

    fqn: str
    kernel: MatrixKernel
    rule: str
    tensor: torch.Tensor
    structure: ParamStructure
    hp: dict[str, Any]
    owner_state: dict[str, torch.Tensor]
    step: int
    param: torch.Tensor | None = None  # complete parameter value, for kernels with transform_needs_param


def transform_complete(items: list[Complete]) -> list[torch.Tensor]:
    """Run each item's ``transform`` batched by shape; returns updates shaped like ``item.tensor``."""
    views = [to_matrices(item.tensor, item.structure) for item in items]
    buckets: dict[tuple, list[int]] = {}
    for index, (item, mats) in enumerate(zip(items, views)):
        # A shape that would not batch bitwise goes alone (see MatrixKernel.batches_bitwise).
        alone = None if item.kernel.batches_bitwise(mats.shape[1], mats.shape[2], item.hp) else index
        key = (item.rule, tuple(mats.shape[1:]), mats.device, mats.dtype,
               tuple(item.hp[k] for k in item.kernel.transform_keys), alone)
        buckets.setdefault(key, []).append(index)
    results: list[torch.Tensor | None] = [None] * len(items)
    for key, indices in buckets.items():
        first = items[indices[0]]
        # cat allocates afresh; a lone item of an unaligned shape is copied so that it starts on an
        # aligned address whatever buffer (e.g. a receive buffer) its view points into
        fresh = (lambda t: t.clone(memory_format=torch.contiguous_format)) if key[-1] is not None else (lambda t: t)
        data = torch.cat([views[i] for i in indices], dim=0) if len(indices) > 1 else fresh(views[indices[0]])
        segments = [Segment(items[i].fqn, views[i].shape[0], items[i].owner_state, items[i].step) for i in indices]
        params = None
        if first.kernel.transform_needs_param:
            params = torch.cat([to_matrices(items[i].param, items[i].structure) for i in indices], dim=0)
        batch = MatrixBatch(data, segments, params)
        for i, piece in zip(indices, batch.split(first.kernel.transform(batch, first.hp))):
            results[i] = from_matrices(piece, items[i].structure, items[i].tensor.shape)
    return results  # type: ignore[return-value]
