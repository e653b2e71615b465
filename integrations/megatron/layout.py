"""Where Megatron keeps each parameter, in the sharding engine's terms: the complete tensor and this rank's piece.

Tensor parallelism: a weight with ``tensor_model_parallel=True`` is split along ``partition_dim``
(QKV, fc1, word embeddings, output layer: dim 0; attention proj, fc2: dim 1). The complete tensor
the engine assembles is the TP ranks' shards concatenated along that dimension in TP-rank order,
which is the weight itself for ``partition_stride=1``. For the fused SwiGLU ``linear_fc1``
(``partition_stride=2``: each rank stores [gate_t; up_t]) the concatenation is a row permutation
of the unsharded [gate; up]; Newton–Schulz, Shampoo/SOAP, Adafactor and the row/column-norm rules
are equivariant under row permutations, so the update is the permuted unsharded one. (A rule that
cuts rows into fixed blocks smaller than the matrix would see other blocks.) Weights without the
flag (norms, position embeddings) are replicated across the TP ranks.

Megatron's distributed optimizer then gives each data-parallel rank a flat range of each TP shard
(ranges follow the gradient buffer, not parameter boundaries). In the complete tensor's
coordinates that range is a ``FlatRange`` when the TP shard is contiguous there (replicated
weights, ``partition_dim=0``) and a ``BlockRange`` (a flat range of a column block) otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from archopt_plugins.planner.plan import Plan
from archopt_plugins.shard.layout import Block, BlockRange, FlatRange, Piece


def unwrap(model_chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside Megatron's wrappers (DistributedDataParallel, Float16Module)."""
    module = model_chunk
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def split_dim(param: torch.Tensor, tp_size: int) -> int | None:
    """The dimension a TP-split weight is cut along, or None for a weight every TP rank holds whole."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim)


def global_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    dim = split_dim(param, tp_size)
    if dim is not None:
        shape[dim] *= tp_size
    return tuple(shape)


def global_plan(plan: Plan, tensors: dict[str, torch.Tensor], tp_size: int) -> Plan:
    """The plan of the TP-local module with every entry in complete-tensor terms.

    Shapes become the complete shapes; a fused QKV's head split (detected on the local rows, a
    whole number of query groups) becomes the split of all query groups.
    """
    if tp_size == 1:
        return plan
    entries = []
    for entry in plan.entries:
        param = tensors[entry.fqn]
        structure = entry.structure
        qkv = structure.qkv
        if qkv is not None and split_dim(param, tp_size) == 0:
            qkv = dataclasses.replace(qkv, num_heads=qkv.num_heads * tp_size, num_kv_heads=qkv.num_kv_heads * tp_size)
            structure = dataclasses.replace(structure, qkv=qkv)
        entries.append(dataclasses.replace(entry, shape=global_shape(param, tp_size), structure=structure))
    return dataclasses.replace(plan, entries=tuple(entries))


def tp_block(param: torch.Tensor, tp_rank: int, tp_size: int) -> Block:
    """This TP rank's shard as a Block of the complete tensor."""
    local = tuple(param.shape)
    offsets = [0] * len(local)
    dim = split_dim(param, tp_size)
    if dim is not None:
        offsets[dim] = tp_rank * local[dim]
    return Block(tuple(offsets), local)


def piece_of(param: torch.Tensor, tp_rank: int, tp_size: int, flat: tuple[int, int] | None) -> Piece:
    """This rank's piece: its TP shard, or the flat range ``flat`` of it (the distributed optimizer's)."""
    block = tp_block(param, tp_rank, tp_size)
    if flat is None:
        return block
    start, stop = flat
    if start >= stop:
        return FlatRange(0, 0)  # this rank holds nothing of it
    if (start, stop) == (0, block.numel):
        return block
    dim = split_dim(param, tp_size)
    if dim is None:
        return FlatRange(start, stop)
    if dim == 0:  # a block of whole rows is contiguous in the complete tensor
        base = tp_rank * block.numel
        return FlatRange(base + start, base + stop)
    return BlockRange(block, start, stop)


def check_tp_attributes(fqn: str, param: Any, tp_size: int) -> None:
    """Refuse TP layouts the complete-tensor description above does not cover, naming the parameter."""
    dim = split_dim(param, tp_size)
    if dim is None:
        return
    if not 0 <= dim < param.ndim:
        raise ValueError(f"parameter {fqn!r}: Megatron partition_dim={dim} for a tensor of shape "
                         f"{tuple(param.shape)}; the adapter cannot place its tensor-parallel shards")
    stride = int(getattr(param, "partition_stride", 1))
    if stride != 1 and dim != 0:
        raise ValueError(f"parameter {fqn!r}: partition_stride={stride} along partition_dim={dim}: interleaved "
                         "column shards are not supported (only row-interleaved fused weights such as SwiGLU fc1)")
