"""Symmetric eigendecompositions for preconditioners: inverse roots (Shampoo) and eigenbases (SOAP).

Shampoo needs L^(−1/p) of a positive semi-definite statistic L = Σ G·Gᵀ; SOAP needs L's eigenbasis.
Both come from ``torch.linalg.eigh``, batched over matrices of one shape, with three safeguards:

* **Rank deficiency.** A block's statistic is singular whenever its gradient has fewer columns than
  rows (a 32×8 block gives a rank-8 32×32 L), and roundoff leaves its null eigenvalues at about
  ±1e-7·λ_max in float32. Raising those to −1/p would amplify roundoff, so eigenvalues are clamped
  at zero and damped *relative to the largest*: λ ← max(λ, 0) + matrix_eps·λ_max. The damped
  root is invariant to the gradient's scale and its condition number is at most matrix_eps^(−1/p).
  A statistic that is exactly zero (no gradient yet) gets the identity: no preconditioning.
* **Failure.** ``eigh`` can fail to converge or return non-finite values. The batched call is
  retried per matrix, first in the requested dtype, then in float64; a matrix that fails even
  then is reported in the ``ok`` mask so the caller keeps its previous root (and warns).
* **Determinism.** Every matrix's result depends only on that matrix: batched and single calls
  agree bitwise (tested), and retries go matrix by matrix. The sharding engine relies on this.

Pure tensor code; the fp64 references below are plain single-matrix versions for the tests.
"""

from __future__ import annotations

import torch


def symmetric_eigh(A: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues [N, r] (ascending) and eigenvectors [N, r, r] of symmetric ``A`` [N, r, r] in ``dtype``.

    Returns (values, vectors, ok); where ``ok[i]`` is False the decomposition failed in ``dtype``
    and in float64, and that matrix's values/vectors are placeholders (zeros / identity).
    """
    work = A.to(dtype)
    n = work.shape[0]
    try:
        values, vectors = torch.linalg.eigh(work)
        ok = _finite_rows(values) & _finite_rows(vectors)
        if bool(ok.all()):
            return values, vectors, ok
    except RuntimeError:  # torch.linalg.LinAlgError: one matrix failed, the batch has no result
        values = torch.zeros(work.shape[:-1], dtype=dtype, device=work.device)
        vectors = torch.eye(work.shape[-1], dtype=dtype, device=work.device).expand_as(work).clone()
        ok = torch.zeros(n, dtype=torch.bool, device=work.device)
    for i in (~ok).nonzero().flatten().tolist():
        values[i], vectors[i] = 0.0, torch.eye(work.shape[-1], dtype=dtype, device=work.device)
        for retry in dict.fromkeys((dtype, torch.float64)):
            try:
                v, q = torch.linalg.eigh(A[i].to(retry))
            except RuntimeError:
                continue
            if bool(torch.isfinite(v).all()) and bool(torch.isfinite(q).all()):
                values[i], vectors[i], ok[i] = v.to(dtype), q.to(dtype), True
                break
    return values, vectors, ok


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t).flatten(1).all(dim=1)


def damped_inverse_powers(values: torch.Tensor, exponent: float, matrix_eps: float) -> torch.Tensor:
    """(max(λ, 0) + matrix_eps·λ_max)^(−exponent), and 1 where the statistic is zero; in float64."""
    lam = values.to(torch.float64).clamp_min(0.0)
    lam_max = lam.amax(dim=-1, keepdim=True)
    has_stats = lam_max > 0
    powers = (lam + matrix_eps * lam_max).where(has_stats, torch.ones_like(lam)).pow(-exponent)
    return powers.where(has_stats, torch.ones_like(lam))


def inverse_root(A: torch.Tensor, exponent: float, matrix_eps: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped A^(−exponent) of each PSD matrix in ``A`` [N, r, r]; returns (roots in A's dtype, ok mask)."""
    values, vectors, ok = symmetric_eigh(A, dtype)
    powers = damped_inverse_powers(values, exponent, matrix_eps).to(dtype)
    root = torch.matmul(vectors * powers.unsqueeze(-2), vectors.mT)
    return root.to(A.dtype), ok


def initial_eigenbasis(A: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of each ``A`` [N, r, r] sorted by descending eigenvalue (SOAP's first basis); (Q, ok)."""
    _, vectors, ok = symmetric_eigh(A, dtype)
    return vectors.flip(-1).to(A.dtype), ok


def refresh_eigenbasis(A: torch.Tensor, Q: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of power iteration with QR from the previous basis ``Q`` (SOAP's cheap refresh).

    The columns of ``Q`` are first sorted by their Rayleigh quotients qᵀAq (descending, stable
    sort), then Q ← qr(A·Q).Q. Returns (new Q, order) where ``order`` [N, r] is the permutation
    applied to the old columns: Adam's second moment, kept in the rotated coordinates, follows it.
    A matrix whose new basis is not finite keeps its sorted old basis.
    """
    work_A, work_Q = A.to(dtype), Q.to(dtype)
    AQ = torch.matmul(work_A, work_Q)
    rayleigh = (AQ * work_Q).sum(dim=-2)
    order = torch.sort(rayleigh, dim=-1, descending=True, stable=True).indices
    columns = order.unsqueeze(-2).expand_as(work_Q)
    sorted_Q = work_Q.gather(-1, columns)
    # A·(Q with permuted columns) is A·Q with the same permutation: reuse it rather than a second
    # r³ matmul (as pytorch-optimizer does). For the factors of benchmarks/preconditioners.py these
    # calls went from 108 to 96 ms (best of 5, 2 CPU cores), giving bitwise the same bases (MKL).
    new_Q = torch.linalg.qr(AQ.gather(-1, columns)).Q
    ok = _finite_rows(new_Q)
    if not bool(ok.all()):
        new_Q = torch.where(ok.view(-1, 1, 1), new_Q, sorted_Q)
    return new_Q.to(Q.dtype), order


# -- fp64 references (single matrix, written plainly) ---------------------------------------------

def inverse_root_reference(A: torch.Tensor, exponent: float, matrix_eps: float) -> torch.Tensor:
    """The damped inverse root of one PSD matrix in float64 (what :func:`inverse_root` computes)."""
    A = A.to(torch.float64)
    values, vectors = torch.linalg.eigh(A)
    lam = values.clamp_min(0.0)
    lam_max = float(lam.max())
    if lam_max == 0.0:
        return torch.eye(A.shape[0], dtype=torch.float64)
    powers = (lam + matrix_eps * lam_max) ** (-exponent)
    return vectors @ torch.diag(powers) @ vectors.T


def refresh_eigenbasis_reference(A: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """:func:`refresh_eigenbasis` for one matrix in float64: sort by Rayleigh quotient, then QR(A·Q)."""
    A, Q = A.to(torch.float64), Q.to(torch.float64)
    rayleigh = [float(Q[:, j] @ A @ Q[:, j]) for j in range(Q.shape[1])]
    order = sorted(range(len(rayleigh)), key=lambda j: -rayleigh[j])  # Python's sort is stable
    Q = Q[:, order]
    new_Q, _ = torch.linalg.qr(A @ Q)
    return new_Q, order
