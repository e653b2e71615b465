"""Where the pieces of a parameter live: one piece per rank, in the stored tensor's coordinates.

Every layout the stacks produce is described the same way: rank r holds either

* a :class:`Block` — a rectangular block (offsets and sizes per dimension). DDP replicas hold the
  whole tensor; FSDP2 ``Shard(0)`` holds a row block (possibly empty, possibly uneven); tensor
  parallelism holds a row or column block; FSDP2 × TP and HSDP compose into blocks too; or
* a :class:`FlatRange` — a contiguous range of the flattened tensor, the form ZeRO-1/2/3 and
  Megatron's distributed optimizer use (ranges cut matrices anywhere, mid-row included); or
* a :class:`BlockRange` — a flat range of one Block (Megatron's distributed optimizer cutting a
  tensor-parallel column block).

Ranks holding identical pieces are replicas; distinct pieces must be disjoint and cover the
tensor exactly (checked: a gap or an overlap raises naming the parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def describe(self) -> str:
        return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes)) + "]"


@dataclass(frozen=True)
class FlatRange:
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"flat[{self.start}:{self.stop}]"


@dataclass(frozen=True)
class BlockRange:
    """Elements [start, stop) of a Block, counted row-major within the block.

    Megatron's distributed optimizer cuts each tensor-parallel shard (a column block for
    ``partition_dim=1``) into flat ranges of that shard, which are neither a Block nor a range of
    the complete tensor.
    """

    block: Block
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"{self.block.describe()}.flat[{self.start}:{self.stop}]"


Piece = Block | FlatRange | BlockRange


def read_piece(full: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The elements of ``piece`` from a complete tensor, flattened (row-major within the piece)."""
    if isinstance(piece, Block):
        return full[piece.slices()].reshape(-1)
    if isinstance(piece, BlockRange):
        return full[piece.block.slices()].reshape(-1)[piece.start:piece.stop]
    return full.reshape(-1)[piece.start:piece.stop]


def write_piece(full: torch.Tensor, piece: Piece, data: torch.Tensor) -> None:
    """Inverse of :func:`read_piece`: place flattened ``data`` into ``full``."""
    if isinstance(piece, Block):
        full[piece.slices()] = data.view(piece.sizes).to(full.dtype)
    elif isinstance(piece, BlockRange):
        block = full[piece.block.slices()]  # a strided view: write through a row-major copy
        flat = block.reshape(-1).clone()
        flat[piece.start:piece.stop] = data.to(full.dtype)
        block.copy_(flat.view(piece.block.sizes))
    else:
        full.view(-1)[piece.start:piece.stop] = data.to(full.dtype)


def _block_overlap(a: Block, b: Block) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes))


def _flat_intervals(piece: Piece, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Flat intervals a piece covers (a block is one interval per row of its last dimension)."""
    if isinstance(piece, FlatRange):
        return [(piece.start, piece.stop)]
    block = piece.block if isinstance(piece, BlockRange) else piece
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    intervals = []
    lead = [range(o, o + s) for o, s in zip(block.offsets[:-1], block.sizes[:-1])]
    for index in _product(lead):
        start = sum(i * st for i, st in zip(index, strides[:-1])) + block.offsets[-1]
        intervals.append((start, start + block.sizes[-1]))
    if isinstance(piece, BlockRange):  # keep the part of each row inside [start, stop) of the block
        width, clipped = block.sizes[-1], []
        for row, (a, _) in enumerate(intervals):
            lo, hi = max(piece.start, row * width), min(piece.stop, (row + 1) * width)
            if lo < hi:
                clipped.append((a + lo - row * width, a + hi - row * width))
        intervals = clipped
    return intervals


def _product(ranges: list[range]):
    if not ranges:
        yield ()
        return
    for i in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (i, *rest)


@dataclass(frozen=True)
class ParamLayout:
    """The pieces of one parameter across the ranks of a process group (index = group rank)."""

    fqn: str
    shape: tuple[int, ...]
    pieces: tuple[Piece | None, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def holders(self) -> list[tuple[Piece, list[int]]]:
        """Distinct non-empty pieces, each with the ranks holding it (replicas), in first-rank order."""
        found: dict[Piece, list[int]] = {}
        for rank, piece in enumerate(self.pieces):
            if piece is not None and piece.numel > 0:
                found.setdefault(piece, []).append(rank)
        return list(found.items())

    def full_holders(self) -> list[int]:
        """Ranks that hold the complete tensor."""
        return [r for piece, ranks in self.holders() if piece.numel == self.numel for r in ranks]

    def describe(self) -> str:
        parts = [f"rank {r}: {p.describe() if p is not None else 'nothing'}" for r, p in enumerate(self.pieces)]
        return f"{self.fqn} {tuple(self.shape)}: " + "; ".join(parts)

    def validate(self) -> None:
        """Distinct pieces must be disjoint and cover the tensor exactly."""
        distinct = [p for p, _ in self.holders()]
        for piece in distinct:
            block = piece.block if isinstance(piece, BlockRange) else piece
            if isinstance(block, Block):
                if len(block.offsets) != len(self.shape) or any(
                        o < 0 or o + s > d for o, s, d in zip(block.offsets, block.sizes, self.shape)):
                    raise ValueError(f"parameter {self.fqn!r}: shard {piece.describe()} lies outside its shape "
                                     f"{tuple(self.shape)}; layout: {self.describe()}")
                if isinstance(piece, BlockRange) and not 0 <= piece.start <= piece.stop <= block.numel:
                    raise ValueError(f"parameter {self.fqn!r}: fragment {piece.describe()} lies outside its "
                                     f"block of {block.numel} elements; layout: {self.describe()}")
            elif piece.start < 0 or piece.stop > self.numel:
                raise ValueError(f"parameter {self.fqn!r}: fragment {piece.describe()} lies outside its "
                                 f"{self.numel} elements; layout: {self.describe()}")
        covered = sum(p.numel for p in distinct)
        if covered != self.numel:
            raise ValueError(f"parameter {self.fqn!r}: its shards cover {covered} of {self.numel} elements "
                             f"(a gap or an overlap); layout: {self.describe()}")
        blocks = [p for p in distinct if isinstance(p, Block)]
        if len(blocks) == len(distinct):
            overlapping = any(_block_overlap(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1:])
        else:  # mixed or flat: compare flat intervals
            intervals = sorted(iv for p in distinct for iv in _flat_intervals(p, self.shape))
            overlapping = any(a[1] > b[0] for a, b in zip(intervals, intervals[1:]))
        if overlapping:
            raise ValueError(f"parameter {self.fqn!r}: two shards overlap; layout: {self.describe()}")


def replicated(fqn: str, shape: tuple[int, ...], world: int) -> ParamLayout:
    """Every rank holds the complete tensor (DDP)."""
    whole = Block(tuple(0 for _ in shape), tuple(shape))
    return ParamLayout(fqn, tuple(shape), tuple(whole for _ in range(world)))


def flat_fragments(fqn: str, shape: tuple[int, ...], ranges: dict[int, tuple[int, int]], world: int) -> ParamLayout:
    """Rank r holds flat elements [start, stop) of the tensor (ZeRO / Megatron distributed optimizer)."""
    pieces = tuple(FlatRange(*ranges[r]) if r in ranges else None for r in range(world))
    layout = ParamLayout(fqn, tuple(shape), pieces)
    layout.validate()
    return layout


def tp_split(fqn: str, shape: tuple[int, ...], dim: int, tp_groups: list[list[int]], world: int) -> ParamLayout:
    """Tensor parallelism: within each TP group (ranks in TP order) rank i holds chunk i along ``dim``.

    TP groups are replicas of each other (data parallelism across them).
    """
    pieces: list[Piece | None] = [None] * world
    for group in tp_groups:
        size = shape[dim]
        if size % len(group):
            raise ValueError(f"parameter {fqn!r}: dimension {dim} of size {size} does not split evenly over "
                             f"{len(group)} tensor-parallel ranks")
        chunk = size // len(group)
        for i, rank in enumerate(group):
            offsets = [0] * len(shape)
            sizes = list(shape)
            offsets[dim], sizes[dim] = i * chunk, chunk
            pieces[rank] = Block(tuple(offsets), tuple(sizes))
    layout = ParamLayout(fqn, tuple(shape), tuple(pieces))
    layout.validate()
    return layout
