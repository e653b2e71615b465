"""State that lives with whole matrices (factors, eigenbases, graft moments) across a MatrixBatch.

A :class:`~.kernel.MatrixBatch` concatenates the matrices of several parameters; each parameter's
owner state holds its own [count, ...] tensors. Kernels gather a key across segments into one
[N, ...] tensor, update it, and scatter it back. With a single segment of the right dtype the
gathered tensor *is* the state (no copy), so in-place updates land directly.

Also here: the guards every preconditioner uses so that a pathological gradient (finite, but
whose square overflows float32) never corrupts state and never reaches a parameter as NaN/Inf.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .kernel import MatrixBatch


def gather_state(batch: MatrixBatch, key: str, shape: tuple[int, ...], dtype: torch.dtype,
                 fill: float = 0.0) -> torch.Tensor:
    """Each segment's ``key`` ([count, *shape], created filled with ``fill`` if missing) as [N, *shape]."""
    device = batch.data.device
    pieces = []
    for seg in batch.segments:
        t = seg.owner_state.get(key)
        if t is None:
            t = torch.full((seg.count, *shape), fill, dtype=dtype, device=device)
            seg.owner_state[key] = t
        elif tuple(t.shape) != (seg.count, *shape):
            raise ValueError(f"parameter {seg.fqn!r}: optimizer state {key!r} has shape {tuple(t.shape)}, "
                             f"expected {(seg.count, *shape)}; was it loaded from a run with other "
                             "hyperparameters (block_size, one_sided_ratio) or another model?")
        pieces.append(t if t.dtype == dtype else t.to(dtype))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def scatter_state(batch: MatrixBatch, key: str, value: torch.Tensor) -> None:
    """Write a gathered [N, ...] tensor back into each segment's state (no-op when it is the state)."""
    segments = batch.segments
    if len(segments) == 1 and segments[0].owner_state[key] is value:
        return
    for seg, piece in zip(segments, torch.split(value, [s.count for s in segments])):
        seg.owner_state[key].copy_(piece)


def matrix_steps(batch: MatrixBatch, repeat: int = 1) -> torch.Tensor:
    """Each matrix's step count (float64 [N·repeat]), from its segment; ``repeat`` = blocks per matrix."""
    return per_matrix(batch, float, repeat, torch.float64)


def per_matrix(batch: MatrixBatch, fn: Callable[[int], float], repeat: int = 1,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fn(step) for each matrix ([N·repeat]), computed in Python per segment.

    Not ``fn(steps_tensor)``: vectorised pow/exp round differently from their scalar tails, so a
    matrix's bias correction would depend on how many other matrices share its batch.
    """
    values = [fn(s.step) for s in batch.segments]
    counts = torch.tensor([s.count * repeat for s in batch.segments])
    return torch.tensor(values, dtype=dtype).repeat_interleave(counts).to(batch.data.device)


def per_matrix_finite(t: torch.Tensor) -> torch.Tensor:
    """[N] bool: whether every entry of matrix i (t shaped [N, ...]) is finite."""
    return torch.isfinite(t).flatten(1).all(dim=1)


def keep_finite_(state: torch.Tensor, new: torch.Tensor) -> None:
    """state ← new where the whole matrix is finite, else unchanged (never let Inf into state)."""
    ok = per_matrix_finite(new)
    if bool(ok.all()):
        state.copy_(new)
    else:
        state.copy_(torch.where(ok.view(-1, *([1] * (new.ndim - 1))), new, state))


def zero_nonfinite_(update: torch.Tensor, batch: MatrixBatch, rule: str) -> torch.Tensor:
    """Zero the update of any matrix that is not finite, and say so (which parameter, and why)."""
    ok = per_matrix_finite(update)
    if bool(ok.all()):
        return update
    bad = sorted({seg.fqn for seg, piece in zip(batch.segments, batch.split(ok)) if not bool(piece.all())})
    warnings.warn(f"{rule}: the update of {bad} was not finite (a gradient too large for float32 "
                  "statistics?); those matrices skip this step", RuntimeWarning, stacklevel=3)
    return torch.where(ok.view(-1, 1, 1), update, torch.zeros_like(update))


def warn_decomposition_failed(batch: MatrixBatch, rows_ok: torch.Tensor, per_matrix: int, what: str) -> None:
    """eigh failed even in float64 for some blocks: they keep their previous root/basis."""
    bad_matrices = (~rows_ok).view(-1, per_matrix).any(dim=1)
    bad = sorted({seg.fqn for seg, piece in zip(batch.segments, batch.split(bad_matrices)) if bool(piece.any())})
    warnings.warn(f"{what}: eigendecomposition failed in float32 and float64 for a block of {bad}; "
                  "it keeps its previous preconditioner", RuntimeWarning, stacklevel=3)
