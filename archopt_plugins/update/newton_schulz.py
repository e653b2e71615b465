"""Newton–Schulz orthogonalization: the approximate polar factor U·Vᵀ of a matrix G = U·S·Vᵀ.

Muon-style rules replace a gradient-like matrix by its polar factor (steepest descent under the
spectral norm). An exact SVD is too slow on accelerators, so we run an odd matrix polynomial
X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X a few times after scaling X to spectral norm ≤ 1. Each iteration
pushes every singular value towards 1 without touching the singular vectors.

Two coefficient sets:

* ``"quintic"`` — one tuple (3.4445, −4.7750, 2.0315) repeated (Keller Jordan's Muon). It is tuned
  for speed of the small singular values, not convergence: after 5 steps the singular values land
  in roughly [0.7, 1.2], which is what Muon wants (an update of the right direction and scale).
* ``"polar_express"`` — a different minimax-optimal tuple per iteration (Amsel et al. 2025,
  arXiv:2505.16932, the 5-step schedule with a 2% safety factor used by modded-nanogpt). It gets
  closer to the true polar factor in the same number of matmuls. Its tuples carry a safety factor
  (they land singular values slightly above 1), so beyond 5 steps it continues with the classical
  convergent quintic (15/8, −5/4, 3/8), whose fixed point is exactly 1: more steps, exact polar factor.

``docs/newton_schulz.md`` records the measured error of both against the fp64 SVD polar factor.

Everything here is pure: batched over leading dimensions, no state, no torch.distributed.
"""

from __future__ import annotations

from typing import Sequence

import torch

Coefficients = tuple[float, float, float]

QUINTIC: tuple[Coefficients, ...] = ((3.4445, -4.7750, 2.0315),)

POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# The Taylor-derived Newton–Schulz quintic: converges to 1 for singular values in (0, ~1.4).
CLASSICAL_QUINTIC: Coefficients = (15 / 8, -10 / 8, 3 / 8)

# Polar Express's tuples assume the input's spectral norm is at most 1/1.02 of its Frobenius bound.
_NORM_SAFETY = {"quintic": 1.0, "polar_express": 1.02}

COEFFICIENT_SETS = ("quintic", "polar_express")


def coefficient_schedule(name: str, steps: int) -> list[Coefficients]:
    """The (a, b, c) tuple of each of ``steps`` iterations for a named coefficient set."""
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    if name == "quintic":
        return [QUINTIC[0]] * steps
    if name == "polar_express":
        return [POLAR_EXPRESS[i] if i < len(POLAR_EXPRESS) else CLASSICAL_QUINTIC for i in range(steps)]
    raise ValueError(f"ns_coefficients must be one of {list(COEFFICIENT_SETS)}, got {name!r}")


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str = "quintic",
    compute_dtype: torch.dtype = torch.float32,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate polar factor of each matrix in ``G`` (shape ``[..., m, n]``).

    The Gram matrix is taken on the smaller side (min(m, n)² in size): XXᵀ for a wide input,
    XᵀX for a tall one, using p(XXᵀ)·X = X·p(XᵀX). A tall input is thus never transposed: no
    strided first iteration and no transposing copy at the end (on CPU this made the 688×256
    matrices of a small Llama ~20% faster than transposing, measured in benchmarks/step_overhead.py's
    setting). The output has ``G``'s shape and ``compute_dtype``, contiguous. A zero matrix maps to
    a zero matrix (the ``eps`` keeps 0/0 away).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    schedule = coefficient_schedule(coefficients, steps)
    batch_shape = G.shape[:-2]
    X = G.to(compute_dtype).reshape(-1, G.size(-2), G.size(-1))
    tall = X.size(-2) > X.size(-1)
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True).mul_(_NORM_SAFETY[coefficients]).add_(eps)
    # In place when the cast above made a copy; never write into the caller's tensor.
    X = X / norm if X.data_ptr() == G.data_ptr() else X.div_(norm)
    chunk = _cpu_chunk(X) if X.device.type == "cpu" else X.size(0)
    if chunk < X.size(0):
        X = torch.cat([_iterate(piece, schedule, tall) for piece in X.split(chunk)])
    else:
        X = _iterate(X, schedule, tall)
    return X.reshape(*batch_shape, G.size(-2), G.size(-1)).contiguous()


_CPU_CACHE_BYTES = 4 << 20


def _cpu_chunk(X: torch.Tensor) -> int:
    """Matrices per batched call on CPU, so that a chunk's working set (X, the Gram matrix, its
    polynomial, the new X) stays within a few MiB of cache. Streaming a whole large batch through
    each matmul evicts X between them: on the parameter set of benchmarks/step_overhead.py (one
    thread, caches cold) chunking took Newton–Schulz from ~101 to ~94 ms per step. GPUs take the
    whole batch in one call."""
    m, n = X.shape[-2:]
    k = min(m, n)
    per_matrix = X.element_size() * (2 * m * n + 2 * k * k)
    return max(1, _CPU_CACHE_BYTES // per_matrix)


def _iterate(X: torch.Tensor, schedule: list[Coefficients], tall: bool) -> torch.Tensor:
    for a, b, c in schedule:
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)  # a·X + X·B | B·X
    return X


def newton_schulz_reference(
    G: torch.Tensor, steps: int = 5, coefficients: str = "quintic", eps: float = 1e-7
) -> torch.Tensor:
    """The same iteration written plainly in float64: the reference the fast path is tested against."""
    schedule = coefficient_schedule(coefficients, steps)
    X = G.to(torch.float64)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.transpose(-2, -1)
    fro = X.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
    X = X / (fro * _NORM_SAFETY[coefficients] + eps)
    for a, b, c in schedule:
        A = X @ X.transpose(-2, -1)
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    if tall:
        X = X.transpose(-2, -1)
    return X


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    """The exact polar factor U·Vᵀ by SVD in float64 (what Newton–Schulz approximates)."""
    U, _, Vh = torch.linalg.svd(G.to(torch.float64), full_matrices=False)
    return U @ Vh


def orthogonality_error(X: torch.Tensor, G: torch.Tensor) -> float:
    """Largest relative Frobenius distance ‖X − polar(G)‖ / ‖polar(G)‖ over a batch."""
    P = polar_factor(G)
    diff = torch.linalg.matrix_norm(X.to(torch.float64) - P, ord="fro")
    ref = torch.linalg.matrix_norm(P, ord="fro")
    return float((diff / ref).max())


def singular_value_range(X: torch.Tensor) -> tuple[float, float]:
    """(smallest, largest) singular value over a batch; for documenting how close to 1 they land."""
    s = torch.linalg.svdvals(X.to(torch.float64))
    return float(s.min()), float(s.max())


def as_batch(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack same-shape matrices into one [B, m, n] batch (one set of batched matmuls)."""
    return torch.stack(list(mats), dim=0)
