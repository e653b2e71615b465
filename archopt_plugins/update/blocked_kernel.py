"""What Shampoo, one-sided Shampoo and SOAP share: a block grid per matrix shape and its bookkeeping.

Each of these kernels keeps per-block factors in owner state (keys suffixed with the block shape)
and some whole-matrix moments. This base derives, from the grid and the hyperparameters, the
shapes of every state tensor (checked when a checkpoint loads), the fp32 bytes they take (shown in
``Plan.summary()``), a one-line description of the blocks, and the owner-balancing cost.
"""

from __future__ import annotations

import math

import torch

from .blocking import BlockGrid, Sides
from .kernel import HParams, MatrixKernel

FLOAT_DTYPES = {"auto": torch.float32, "float32": torch.float32, "float64": torch.float64}


def compute_dtype_of(hp: HParams) -> torch.dtype:
    """Statistics and preconditioning run in float32 ('auto') or float64: bf16 loses small eigenvalues."""
    return FLOAT_DTYPES[hp["compute_dtype"]]


class BlockedPreconditionerKernel(MatrixKernel):
    sides: Sides = "two_sided"
    state_shapes_complete = True

    def batches_bitwise(self, fan_out: int, fan_in: int, hp: HParams) -> bool:
        # the blocks' sides are block_size or remainders of the matrix's sides
        return super().batches_bitwise(fan_out, fan_in, hp) and hp["block_size"] % 16 == 0

    def grid(self, fan_out: int, fan_in: int, hp: HParams) -> BlockGrid:
        ratio = hp.get("one_sided_ratio", float("inf"))
        return BlockGrid(fan_out, fan_in, hp["block_size"], self.sides, ratio)

    # Subclasses list their state: whole-matrix owner keys and per-class factor keys.
    def owner_matrix_keys(self, hp: HParams) -> tuple[str, ...]:
        return ()

    def factor_keys(self, side: str) -> tuple[str, ...]:
        """Per-block keys for one side ("L" or "R"), without the ".RxC" suffix."""
        return (side,)

    def local_keys(self, hp: HParams) -> tuple[str, ...]:
        return ()

    def state_shapes(self, shape: tuple[int, ...], matrix_shape: tuple[int, int, int] | None,
                     hp: HParams) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {k: tuple(shape) for k in self.local_keys(hp)}
        if matrix_shape is None:
            return shapes
        count, m, n = matrix_shape
        for key in self.owner_matrix_keys(hp):
            shapes[key] = (count, m, n)
        for cl in self.grid(m, n, hp).classes:
            for side, on, size in (("L", cl.left, cl.rows), ("R", cl.right, cl.cols)):
                if on:
                    for key in self.factor_keys(side):
                        shapes[f"{key}.{cl.key}"] = (count, cl.count, size, size)
        return shapes

    def state_bytes(self, shape, matrix_shape, hp) -> int:
        return 4 * sum(math.prod(s) for s in self.state_shapes(tuple(shape), matrix_shape, hp).values())

    def describe(self, matrix_shape: tuple[int, int, int] | None, hp: HParams) -> str:
        if matrix_shape is None:
            return ""
        return self.grid(matrix_shape[1], matrix_shape[2], hp).describe()

    def cost(self, count: int, fan_out: int, fan_in: int) -> float:
        """~ the eigendecompositions' and preconditioning matmuls' flops (owner load balancing)."""
        return float(count) * (fan_out ** 3 + fan_in ** 3 + fan_out * fan_in * (fan_out + fan_in))
