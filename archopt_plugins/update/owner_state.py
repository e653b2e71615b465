"""State that lives with whole matrices (factors, eigenbases, graft moments) across a MatrixBatch.

A :class:`~.kernel.MatrixBatch` concatenates the matrices of several parameters; each parameter's
owner state holds its own [count, ...] tensors. Kernels compute batched where the work is
arithmetic (G·Gᵀ for the whole batch at once) and update each segment's state *in place* through
its span of the batch (``spans``): concatenating factor matrices every step and copying them back
cost more than the arithmetic they serve (measured on CPU). Only occasional work (roots, bases:
every k steps) concatenates the states of the parameters that are due.

Also here: the guards every preconditioner uses so that a pathological gradient (finite, but
whose square overflows float32) never corrupts state and never reaches a parameter as NaN/Inf.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import torch

from .kernel import MatrixBatch, Segment


def state_of(seg: Segment, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             fill: float = 0.0) -> torch.Tensor:
    """``seg``'s state ``key`` shaped [count, *shape] in ``dtype``, created filled with ``fill`` if missing."""
    t = seg.owner_state.get(key)
    if t is None:
        t = torch.full((seg.count, *shape), fill, dtype=dtype, device=device)
        seg.owner_state[key] = t
    elif tuple(t.shape) != (seg.count, *shape):
        raise ValueError(f"parameter {seg.fqn!r}: optimizer state {key!r} has shape {tuple(t.shape)}, "
                         f"expected {(seg.count, *shape)}; was it loaded from a run with other "
                         "hyperparameters (block_size, one_sided_ratio) or another model?")
    elif t.dtype != dtype:  # e.g. torch's load_state_dict cast it to a bf16 parameter's dtype
        t = t.to(dtype)
        seg.owner_state[key] = t
    return t


def spans(batch: MatrixBatch, per_matrix: int = 1) -> Iterator[tuple[Segment, int, int]]:
    """(segment, start, end) of each segment's rows in a batch of ``per_matrix`` rows per matrix."""
    start = 0
    for seg in batch.segments:
        end = start + seg.count * per_matrix
        yield seg, start, end
        start = end


def per_matrix(batch: MatrixBatch, fn: Callable[[int], float], repeat: int = 1,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fn(step) for each matrix ([N·repeat]), computed in Python per segment.

    Not ``fn(steps_tensor)``: vectorised pow/exp round differently from their scalar tails, so a
    matrix's bias correction would depend on how many other matrices share its batch.
    """
    values = [fn(s.step) for s in batch.segments]
    counts = torch.tensor([s.count * repeat for s in batch.segments])
    return torch.tensor(values, dtype=dtype).repeat_interleave(counts).to(batch.data.device)


def finite_rows(probe: torch.Tensor) -> torch.Tensor:
    """[N] bool from a per-matrix probe [N, ...] whose finiteness implies the matrix's.

    Probes are cheap: the diagonal of a PSD statistic (|Lᵢⱼ| ≤ √(Lᵢᵢ·Lⱼⱼ)), or a per-matrix sum
    (a sum is finite only if every term is; an overflowing sum of finite terms is flagged too,
    which errs on the safe side).
    """
    return torch.isfinite(probe).flatten(1).all(dim=1) if probe.ndim > 1 else torch.isfinite(probe)


def matrix_sums(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=tuple(range(1, t.ndim)))


def keep_finite_(state: torch.Tensor, new: torch.Tensor, probe: torch.Tensor | None = None) -> None:
    """state ← new where the whole matrix is finite, else unchanged (never let Inf into state)."""
    ok = finite_rows(matrix_sums(new) if probe is None else probe)
    if bool(ok.all()):
        state.copy_(new)
    else:
        state.copy_(torch.where(ok.view(-1, *([1] * (new.ndim - 1))), new, state))


def gradient_rows_ok(G: torch.Tensor) -> torch.Tensor | None:
    """None when every matrix of G [N, m, n] has a finite ‖G‖², else the [N] mask of those that do.

    A finite ‖G‖² bounds every statistic built from G (|G·Gᵀ|ᵢⱼ, G², rotated G'² ≤ ‖G‖²), so the
    EMA updates of such matrices can run in place unchecked: a convex combination of finite values
    is finite. ArchOpt has already refused NaN/Inf gradients; this catches finite ones whose squares
    overflow float32.
    """
    ok = torch.isfinite(torch.linalg.vector_norm(G.flatten(1), dim=1))
    return None if bool(ok.all()) else ok


def update_rows_(state: torch.Tensor, new_fn: Callable[[torch.Tensor], torch.Tensor],
                 inplace_fn: Callable[[torch.Tensor], object], ok: torch.Tensor | None) -> None:
    """Run ``inplace_fn(state)`` when every row is ok; otherwise state ← new_fn(state) on ok rows only."""
    if ok is None:
        inplace_fn(state)
    elif bool(ok.any()):
        state.copy_(torch.where(ok.view(-1, *([1] * (state.ndim - 1))), new_fn(state), state))


def zero_nonfinite_(update: torch.Tensor, batch: MatrixBatch, rule: str) -> torch.Tensor:
    """Zero the update of any matrix that is not finite, and say so (which parameter, and why)."""
    ok = finite_rows(matrix_sums(update))
    if bool(ok.all()):
        return update
    bad = sorted({seg.fqn for seg, piece in zip(batch.segments, batch.split(ok)) if not bool(piece.all())})
    warnings.warn(f"{rule}: the update of {bad} was not finite (a gradient too large for float32 "
                  "statistics?); their fresh update is zero this step and their statistics were kept",
                  RuntimeWarning, stacklevel=3)
    return torch.where(ok.view(-1, 1, 1), update, torch.zeros_like(update))


def warn_decomposition_failed(fqns: list[str], what: str) -> None:
    """eigh failed even in float64 for some blocks: they keep their previous root/basis."""
    warnings.warn(f"{what}: eigendecomposition failed in float32 and float64 for a block of {sorted(set(fqns))}; "
                  "it keeps its previous preconditioner", RuntimeWarning, stacklevel=3)
