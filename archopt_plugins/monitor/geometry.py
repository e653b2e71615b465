"""Geometry of one optimizer step on one tensor: pure measurements, no optimizer knowledge.

Every function takes tensors and returns tensors or floats; ``monitor.GeometryMonitor`` decides
when to call them and how to name the results.

*Blocks.* A scale-invariant parameter is invariant as a whole or per block of rows of its matrix
view (one attention head's rows under per-head QK-norm, one output channel before BatchNorm).
The angle and the effective learning rate that the theory predicts are per block, so the
functions here see a tensor as ``[num_blocks, block_numel]`` (``blocks``); a tensor without
block structure is one block.

*Angles.* ``arccos`` of a cosine near 1 loses half the digits (an angle of 1e-4 rad would come out
of float32 as 0 or 3e-4); ``2·atan2(‖a−b‖, ‖a+b‖)`` of the unit vectors is accurate at every angle.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..roles.types import ParamStructure
from ..update.matrix_view import to_matrices


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def blocks(t: torch.Tensor, structure: ParamStructure | None = None, block_rows: int = 0) -> torch.Tensor:
    """``t`` as ``[num_blocks, block_numel]`` in a float working dtype.

    ``block_rows`` > 0 cuts each matrix of the matrix view [B, fan_out, fan_in] into blocks of that
    many consecutive rows; 0 keeps each tensor whole (one block). Tensors below 2-D are one block.
    """
    t = t.detach().to(_work_dtype(t))
    if t.ndim < 2 or block_rows <= 0:
        return t.reshape(1, -1)
    structure = structure or ParamStructure()
    if getattr(structure, "per_head", False):  # blocks count rows of the whole matrix, not of one head
        structure = dataclasses.replace(structure, per_head=False)
    mats = to_matrices(t, structure)
    batch, rows, cols = mats.shape
    if rows % block_rows:
        raise ValueError(f"block_rows={block_rows} does not divide the {rows} rows of a matrix of shape "
                         f"{tuple(mats.shape[1:])}")
    return mats.reshape(batch * (rows // block_rows), block_rows * cols)


def block_norms(b: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each block ([num_blocks])."""
    return torch.linalg.vector_norm(b, dim=1)


def block_angles(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Angle (radians) between each block before and after a step; NaN where a block is zero."""
    nb, na = block_norms(before), block_norms(after)
    ub = before / nb.clamp_min(torch.finfo(before.dtype).tiny)[:, None]
    ua = after / na.clamp_min(torch.finfo(after.dtype).tiny)[:, None]
    angle = 2.0 * torch.atan2(block_norms(ua - ub), block_norms(ua + ub))
    return torch.where((nb > 0) & (na > 0), angle, torch.full_like(angle, float("nan")))


def nanmean(t: torch.Tensor) -> float:
    """Mean over the finite entries; NaN when there are none."""
    finite = t[torch.isfinite(t)]
    return float(finite.mean()) if finite.numel() else float("nan")


def power_iteration(mats: torch.Tensor, v: torch.Tensor | None = None, iters: int = 2,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral-norm estimates of a batch of matrices [B, m, n] by power iteration on AᵀA.

    Returns (σ [B], v [B, n]); pass ``v`` back next time (warm start), so a few iterations per call
    track the top singular value as the weights drift. Each estimate ‖A·v‖ with ‖v‖ = 1 is a lower
    bound of σ_max that tightens as ``v`` converges to the top right singular vector.
    """
    mats = mats.detach().to(_work_dtype(mats))
    batch, _, cols = mats.shape
    if v is None or v.shape != (batch, cols):
        v = torch.randn(batch, cols, generator=generator, dtype=mats.dtype).to(mats.device)
    v = v.to(mats.dtype)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30)
    for _ in range(max(1, iters)):
        u = torch.bmm(mats, v[:, :, None])  # [B, m, 1]
        w = torch.bmm(mats.mT, u)[:, :, 0]  # AᵀA v
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        v = torch.where(norm > 0, w / norm.clamp_min(1e-30), v)
    sigma = torch.linalg.vector_norm(torch.bmm(mats, v[:, :, None])[:, :, 0], dim=1)
    return sigma, v


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
