"""Seeing a stored parameter (or its gradient / update) as a batch of matrices [B, fan_out, fan_in].

Matrix rules work on "the matrix a layer applies": rows are outputs, columns inputs. The stored
layout differs by module kind (see ``roles.types.ParamStructure``); these functions convert there
and back without copying when the layout allows. This module is the one place that defines the
view: every executor (one process, or the sharding engine on an owner rank) calls it on complete
tensors. Pure tensor code.

The matrix options every matrix rule honours:

* per-expert batching — a stacked MoE weight [E, out, in] (``batch_dims=1``) is E matrices;
* conv kernels flattened — [out, in, k...] is one matrix [out, in·k...];
* per-head — with ``ParamStructure.per_head`` the rows are cut into attention heads, one matrix
  per head. A fused QKV is cut into its q, k and v heads in storage order; this works the same for
  the concatenated layout [q heads | k heads | v heads] and for the layout grouped per query group
  (Megatron, GPT-NeoX: [q heads of group 0 | k0 | v0 | q heads of group 1 | ...]) because every
  head is a contiguous block of ``head_dim`` rows in both. Separate q/k/v projections are cut the
  same way, so a fused and an unfused model get the same per-head update.

``per_head`` is chosen by a rule's hyperparameters and folded into the plan entry's structure by
:func:`view_structure`, so the executors need no extra argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

from ..roles.types import ParamStructure


def head_rows(structure: ParamStructure) -> int | None:
    """Rows per attention head of the matrix view, or None when the parameter has no detected heads."""
    if structure.qkv is not None:
        return structure.qkv.head_dim
    return structure.head_dim


def _split_rows(structure: ParamStructure) -> int | None:
    return head_rows(structure) if structure.per_head else None


def _whole_shape(shape: torch.Size | tuple[int, ...], structure: ParamStructure) -> tuple[int, int, int]:
    b = structure.batch_dims
    batch = math.prod(shape[:b]) if b else 1
    rest = tuple(shape[b:])
    rows, cols = rest[0], math.prod(rest[1:])  # a conv kernel's trailing dims fold into fan_in
    if structure.transposed:
        rows, cols = cols, rows
    return batch, rows, cols


def matrix_shape(shape: torch.Size | tuple[int, ...], structure: ParamStructure) -> tuple[int, int, int]:
    """(B, fan_out, fan_in) of the matrices a tensor of ``shape`` holds."""
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs >= 2 dimensions, got shape {tuple(shape)}")
    batch, rows, cols = _whole_shape(shape, structure)
    head = _split_rows(structure)
    if head is not None:
        if rows % head:
            raise ValueError(f"a per-head view needs fan_out divisible by head_dim {head}, got shape {tuple(shape)}")
        batch, rows = batch * (rows // head), head
    return batch, rows, cols


def to_matrices(t: torch.Tensor, structure: ParamStructure) -> torch.Tensor:
    """View ``t`` as [B, fan_out, fan_in] (a view when possible; per-head cuts of a transposed
    layout copy)."""
    b = structure.batch_dims
    rest = t.shape[b:]
    rows = rest[0]
    m = t.reshape(-1, rows, math.prod(rest[1:]))
    if structure.transposed:
        m = m.mT
    head = _split_rows(structure)
    if head is not None:
        m = m.reshape(-1, head, m.shape[-1])
    return m


def from_matrices(m: torch.Tensor, structure: ParamStructure, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_matrices`: back to the stored ``shape``."""
    if _split_rows(structure) is not None:
        _, rows, cols = _whole_shape(shape, structure)
        m = m.reshape(-1, rows, cols)
    if structure.transposed:
        m = m.mT
    return m.reshape(shape)


# Hyperparameter values that select the per-head view, and whether a parameter without detected
# heads is then an error (True: a statistic per head cannot exist without heads) or is simply seen
# whole (False: "orthogonalize heads separately" leaves an MLP matrix as it is).
PER_HEAD_SWITCHES: dict[str, tuple[Any, bool]] = {
    "per_head": (True, False),  # Muon, Scion, ...: per-head orthogonalization / normalization
    "block": ("head", True),  # blockwise Adam: one second moment per head
}


def view_structure(structure: ParamStructure, hparams: Mapping[str, Any], where: str) -> ParamStructure:
    """The structure a rule with ``hparams`` sees (per-head or whole); raises naming ``where``."""
    per_head = False
    for key, (value, required) in PER_HEAD_SWITCHES.items():
        if key in hparams and hparams[key] == value:
            if head_rows(structure) is None and required:
                raise ValueError(
                    f"{where}: {key}={value!r} needs the parameter's attention heads, and none were detected "
                    "(only q/k/v projections and fused QKV weights of a recognised attention module have "
                    f"them); set {key} to another value for this parameter with an override, e.g. "
                    f"overrides={{'<role or FQN glob>': {{'{key}': ...}}}}")
            per_head = True
    if per_head and head_rows(structure) is not None:
        return dataclasses.replace(structure, per_head=True)
    return structure
