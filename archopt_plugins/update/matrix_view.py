"""Seeing a stored parameter (or its gradient / update) as a batch of matrices [B, fan_out, fan_in].

Matrix rules work on "the matrix a layer applies": rows are outputs, columns inputs. The stored
layout differs by module kind (see ``roles.types.ParamStructure``); these two functions convert
there and back without copying when the layout allows. Pure tensor code.
"""

from __future__ import annotations

import math

import torch

from ..roles.types import ParamStructure


def matrix_shape(shape: torch.Size | tuple[int, ...], structure: ParamStructure) -> tuple[int, int, int]:
    """(B, fan_out, fan_in) of the matrices a tensor of ``shape`` holds."""
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs >= 2 dimensions, got shape {tuple(shape)}")
    b = structure.batch_dims
    batch = math.prod(shape[:b]) if b else 1
    rest = tuple(shape[b:])
    rows, cols = rest[0], math.prod(rest[1:])  # a conv kernel's trailing dims fold into fan_in
    if structure.transposed:
        rows, cols = cols, rows
    return batch, rows, cols


def to_matrices(t: torch.Tensor, structure: ParamStructure) -> torch.Tensor:
    """View ``t`` as [B, fan_out, fan_in] (a view when possible)."""
    b = structure.batch_dims
    rest = t.shape[b:]
    rows = rest[0]
    m = t.reshape(-1, rows, math.prod(rest[1:]))
    return m.mT if structure.transposed else m


def from_matrices(m: torch.Tensor, structure: ParamStructure, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_matrices`: back to the stored ``shape``."""
    if structure.transposed:
        m = m.mT
    return m.reshape(shape)
