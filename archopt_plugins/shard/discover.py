"""Discovering each parameter's layout at the first step, from what every rank holds.

Each rank describes its own piece of every parameter — a DTensor's local block (from its mesh and
placements, the computation torch's distributed checkpoint uses), the complete tensor for a plain
tensor of the planned shape (DDP), or a fragment an adapter registered (ZeRO, Megatron) — and one
``all_gather_object`` turns those descriptions into a :class:`ParamLayout` per parameter. This
works for any mesh arrangement (FSDP2 on a sub-mesh beside TP, HSDP replicas) because it never
interprets placements globally: it asks every rank what it has.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .layout import Block, ParamLayout, Piece


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores (a DTensor's local shard; anything else as is)."""
    return t.to_local() if _is_dtensor(t) else t


def local_piece(fqn: str, tensor: torch.Tensor, planned: tuple[int, ...], hints: dict[str, Piece]) -> Piece:
    """This rank's piece of a parameter, in the complete tensor's coordinates."""
    if fqn in hints:
        return hints[fqn]
    if _is_dtensor(tensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(tuple(tensor.shape), tensor.device_mesh,
                                                              tensor.placements)
        if tuple(tensor.shape) != tuple(planned):
            raise ValueError(f"parameter {fqn!r}: DTensor of global shape {tuple(tensor.shape)}, but the plan was "
                             f"made for shape {tuple(planned)}; build the optimizer from the same model")
        return Block(tuple(int(o) for o in offset), tuple(int(s) for s in shape))
    if tuple(tensor.shape) == tuple(planned):
        return Block(tuple(0 for _ in planned), tuple(planned))
    if tensor.ndim == 1 and len(planned) >= 2:
        raise ValueError(f"parameter {fqn!r}: a flat 1-D tensor of {tensor.numel()} elements arrived where the "
                         f"plan has a matrix of shape {tuple(planned)}, and no fragment map says which elements "
                         "it holds; a matrix rule cannot update it. The stack's adapter must register its fragment "
                         "ranges (archopt_plugins.integrations), or run this parameter with an elementwise rule")
    raise ValueError(f"parameter {fqn!r}: cannot determine its layout: this rank holds a plain tensor of shape "
                     f"{tuple(tensor.shape)} but the plan has shape {tuple(planned)} (not a DTensor, no fragment or "
                     "tensor-parallel map registered)")


def discover_layouts(params: list[tuple[str, torch.Tensor, tuple[int, ...]]], hints: dict[str, Piece],
                     group: Any = None) -> dict[str, ParamLayout]:
    """Layouts of ``params`` (fqn, tensor, planned shape) across ``group``; identical result on every rank."""
    mine = {fqn: local_piece(fqn, t, shape, hints) for fqn, t, shape in params}
    world = dist.get_world_size(group)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (sorted(mine), mine), group=group)
    names = everyone[0][0]
    for rank, (theirs, _) in enumerate(everyone):
        if theirs != names:
            missing = sorted(set(names) ^ set(theirs))
            raise ValueError(f"ranks step different parameter sets: rank 0 and rank {rank} differ at {missing[:3]}; "
                             "every rank must build the optimizer from the same model")
    shapes = {fqn: tuple(shape) for fqn, _, shape in params}
    layouts = {}
    for fqn in names:
        layout = ParamLayout(fqn, shapes[fqn], tuple(pieces[fqn] for _, pieces in everyone))
        layout.validate()
        layouts[fqn] = layout
    return layouts
