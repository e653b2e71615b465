"""One owner per expert: a 3-D MoE weight [E, ...] seen by the engine as E units of its own.

A MoE layer stores its experts as one tensor whose first dimension is the expert. With one owner
per tensor, one rank would orthogonalize all E experts of a layer while the others wait, and FSDP2's
``Shard(0)`` — which already places whole experts on ranks — would be undone by a gather. Split per
expert, each expert is a unit of the cost model: the owner prefers a rank holding the whole expert
(then nothing moves), and the work spreads over the ranks.

Only kernels whose transform treats every matrix alone and keeps no owner state may be split
(``MatrixKernel.splits_by_matrix``: Muon, Scion's matrix LMOs): their results do not depend on
which rank computes which matrix. Each expert e becomes a layout named ``"<fqn>#e"`` of shape
[1, ...]: the part of every rank's piece that falls in expert e (a Block keeps its inner offsets;
a flat fragment is clipped to expert e's flat range). Parameters with pieces of another kind
(Megatron's ``BlockRange``) keep one owner for the whole tensor.
"""

from __future__ import annotations

import math

import torch

from .layout import Block, FlatRange, ParamLayout, Piece


def expert_name(fqn: str, expert: int) -> str:
    return f"{fqn}#{expert}"


def _clip(piece: Piece | None, expert: int, inner: tuple[int, ...]) -> Piece | None:
    """The part of ``piece`` inside expert ``expert``, in that expert's [1, *inner] coordinates."""
    if piece is None:
        return None
    if isinstance(piece, Block):
        first, count = piece.offsets[0], piece.sizes[0]
        if not first <= expert < first + count:
            return None
        return Block((0, *piece.offsets[1:]), (1, *piece.sizes[1:]))
    size = math.prod(inner)
    lo, hi = max(piece.start, expert * size), min(piece.stop, (expert + 1) * size)
    return FlatRange(lo - expert * size, hi - expert * size) if lo < hi else None


def split_by_expert(layout: ParamLayout) -> list[ParamLayout] | None:
    """The per-expert layouts of a [E, ...] parameter, or None when it cannot be split."""
    experts, inner = layout.shape[0], tuple(layout.shape[1:])
    if experts < 2 or not all(p is None or isinstance(p, (Block, FlatRange)) for p in layout.pieces):
        return None
    return [ParamLayout(expert_name(layout.fqn, e), (1, *inner), tuple(_clip(p, e, inner) for p in layout.pieces))
            for e in range(experts)]


def take_expert(local: torch.Tensor, piece: Piece, expert: int, inner: tuple[int, ...]) -> torch.Tensor:
    """Expert ``expert``'s part of this rank's local tensor (a view), shaped as its clipped piece."""
    if isinstance(piece, Block):
        row = expert - piece.offsets[0]
        return local[row:row + 1]
    size = math.prod(inner)
    flat = local.reshape(-1)
    lo, hi = max(piece.start, expert * size), min(piece.stop, (expert + 1) * size)
    return flat[lo - piece.start:hi - piece.start]


def join_experts(parts: list[torch.Tensor], piece: Piece, local_shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`take_expert` over every expert this rank holds (in expert order)."""
    if isinstance(piece, Block):
        return torch.cat([p.reshape(1, *piece.sizes[1:]) for p in parts], dim=0).reshape(local_shape)
    return torch.cat([p.reshape(-1) for p in parts]).reshape(local_shape)


def held_experts(piece: Piece | None, experts: int, inner: tuple[int, ...]) -> list[int]:
    """The experts this rank's piece touches, in order."""
    return [e for e in range(experts) if _clip(piece, e, inner) is not None]
