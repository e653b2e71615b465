"""Cutting matrices into preconditioner blocks, and which sides of each block get a factor.

Shampoo and SOAP keep an r×r and a c×c statistic per r×c matrix; for a 4096×11008 MLP weight that
is 137M + 17M numbers and an eigendecomposition of an 11008² matrix. Blocking bounds both: each
matrix is cut into a grid of blocks of at most ``block_size`` per side (full blocks, then one
remainder row/column of blocks), and every block gets its own factors. A 4096×11008 matrix with
``block_size=1024`` becomes 40 blocks of 1024×1024 and 4 of 1024×768.

Blocks of one shape form a *class*; each class is batched as [N·k, r, c] (N matrices, k blocks of
that shape each), so a model's blocks cost a handful of batched calls. Per-class state lives under
keys suffixed with the block shape (``"L.1024x768"``).

Which sides are preconditioned:

* ``"two_sided"`` (Shampoo, SOAP): both, unless the block is very unbalanced (longer side more than
  ``one_sided_ratio`` times the shorter), where only the shorter side is: the long side's factor
  would cost more than the block itself and, being rank ≤ the short side, carries little.
* ``"one_sided"`` (one-sided Shampoo): the shorter side (rows on a tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Sides = Literal["two_sided", "one_sided"]


@dataclass(frozen=True)
class BlockClass:
    rows: int
    cols: int
    row_count: int  # blocks of this shape along the rows of a matrix
    col_count: int
    row_start: int  # where this class's region starts in the matrix
    col_start: int
    left: bool  # precondition the row side (an r×r factor)
    right: bool  # precondition the column side (a c×c factor)

    @property
    def key(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def count(self) -> int:
        return self.row_count * self.col_count

    @property
    def exponent(self) -> float:
        """Inverse-root exponent per factor: 1/4 with two factors, 1/2 with one (Shampoo's 1/(2k))."""
        return 1.0 / (2 * (int(self.left) + int(self.right)))


def _pieces(size: int, block: int) -> list[tuple[int, int, int]]:
    """(piece size, count, start) runs along one dimension: full blocks, then a remainder."""
    full, rest = divmod(size, block)
    runs = [(block, full, 0)] if full else []
    if rest:
        runs.append((rest, 1, full * block))
    return runs


def _sides(rows: int, cols: int, sides: Sides, one_sided_ratio: float) -> tuple[bool, bool]:
    shorter_left = rows <= cols
    if sides == "one_sided" or max(rows, cols) > one_sided_ratio * min(rows, cols):
        return shorter_left, not shorter_left
    return True, True


class BlockGrid:
    """The block layout of an m×n matrix: classes of equal block shape, split and merge."""

    def __init__(self, rows: int, cols: int, block_size: int, sides: Sides = "two_sided",
                 one_sided_ratio: float = float("inf")) -> None:
        self.rows, self.cols, self.block_size = rows, cols, block_size
        self.classes: list[BlockClass] = []
        for r, rc, r0 in _pieces(rows, block_size):
            for c, cc, c0 in _pieces(cols, block_size):
                left, right = _sides(r, c, sides, one_sided_ratio)
                self.classes.append(BlockClass(r, c, rc, cc, r0, c0, left, right))

    def split(self, X: torch.Tensor) -> list[torch.Tensor]:
        """[N, m, n] → one [N·k, r, c] tensor per class (copies; matrix-major, then block row-major)."""
        out = []
        for cl in self.classes:
            region = X[:, cl.row_start:cl.row_start + cl.rows * cl.row_count,
                       cl.col_start:cl.col_start + cl.cols * cl.col_count]
            blocks = region.reshape(X.shape[0], cl.row_count, cl.rows, cl.col_count, cl.cols)
            # Always contiguous: reductions over a strided view sum in another order, and a block's
            # result must not depend on whether its matrix was alone (a view) or batched (a copy).
            out.append(blocks.permute(0, 1, 3, 2, 4).reshape(-1, cl.rows, cl.cols).contiguous())
        return out

    def merge(self, parts: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`split`; writes into ``out`` ([N, m, n]) when given."""
        n = parts[0].shape[0] // self.classes[0].count
        if out is None and len(self.classes) == 1 and self.classes[0].count == 1:
            return parts[0].view(n, self.rows, self.cols)  # one block: nothing to assemble
        if out is None:
            out = torch.empty(n, self.rows, self.cols, dtype=parts[0].dtype, device=parts[0].device)
        for cl, part in zip(self.classes, parts):
            blocks = part.reshape(n, cl.row_count, cl.col_count, cl.rows, cl.cols).permute(0, 1, 3, 2, 4)
            out[:, cl.row_start:cl.row_start + cl.rows * cl.row_count,
                cl.col_start:cl.col_start + cl.cols * cl.col_count] = blocks.reshape(
                    n, cl.rows * cl.row_count, cl.cols * cl.col_count)
        return out

    def factor_numel(self) -> int:
        """Numbers in one set of factors (one r×r and/or c×c per block) for one matrix."""
        return sum(cl.count * ((cl.rows ** 2 if cl.left else 0) + (cl.cols ** 2 if cl.right else 0))
                   for cl in self.classes)

    def describe(self) -> str:
        """e.g. ``"blocks 1024x1024 x40 L+R, 1024x768 x4 L+R"`` (``"1 block 32x64 L+R"`` when unblocked)."""
        parts = []
        for cl in self.classes:
            sides = "+".join(s for s, on in (("L", cl.left), ("R", cl.right)) if on)
            parts.append(f"{cl.key} x{cl.count} {sides}" if cl.count > 1 or len(self.classes) > 1
                         else f"{cl.key} {sides}")
        total = sum(cl.count for cl in self.classes)
        return ("blocks " if total > 1 else "1 block ") + ", ".join(parts)
