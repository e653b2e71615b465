"""Newton–Schulz against the exact polar factor (fp64 SVD) and the fast path against its fp64 reference."""

import pytest
import torch

from archopt_plugins.update.newton_schulz import (coefficient_schedule, newton_schulz, newton_schulz_reference,
                                                  orthogonality_error, polar_factor, singular_value_range)


def _matrix(m, n, cond=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if cond is None:
        return torch.randn(m, n, generator=gen, dtype=torch.float64)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return U @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)) @ V.T


# (coefficients, steps, max relative error vs the polar factor, singular-value band) on Gaussian
# 128x256 matrices; the measured values are in docs/newton_schulz.md.
ACCURACY = [
    ("quintic", 5, 0.25, (0.6, 1.25)),
    ("polar_express", 5, 0.12, (0.8, 1.2)),
    ("polar_express", 8, 1e-3, (0.99, 1.01)),
]


@pytest.mark.parametrize("coefficients,steps,max_err,band", ACCURACY)
def test_approaches_polar_factor(coefficients, steps, max_err, band):
    G = _matrix(128, 256)
    X = newton_schulz_reference(G, steps, coefficients)
    assert orthogonality_error(X, G) < max_err
    lo, hi = singular_value_range(X)
    assert band[0] < lo and hi < band[1]


def test_polar_express_converges_with_more_steps_even_ill_conditioned():
    G = _matrix(64, 96, cond=1e3)
    assert orthogonality_error(newton_schulz_reference(G, 12, "polar_express"), G) < 1e-6


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_fast_path_matches_fp64_reference(coefficients, shape):
    G = _matrix(*shape, seed=3)
    fast = newton_schulz(G.float(), 5, coefficients, torch.float32)
    ref = newton_schulz_reference(G, 5, coefficients)
    assert fast.dtype == torch.float32 and fast.shape == G.shape
    assert (fast.double() - ref).norm() / ref.norm() < 2e-5


def test_bf16_compute_is_close_but_not_exact():
    G = _matrix(64, 128, seed=4)
    ref = newton_schulz_reference(G, 5)
    fast = newton_schulz(G.float(), 5, "quintic", torch.bfloat16)
    rel = float((fast.double() - ref).norm() / ref.norm())
    assert fast.dtype == torch.bfloat16 and 1e-5 < rel < 5e-2


def test_batched_equals_one_by_one_and_tall_is_transpose_of_wide():
    G = torch.stack([_matrix(40, 24, seed=s) for s in range(3)]).float()
    batched = newton_schulz(G, 5)
    for i in range(3):
        single = newton_schulz(G[i], 5)
        torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(newton_schulz(G[i].T.contiguous(), 5), single.T, rtol=1e-5, atol=1e-6)


def test_polar_factor_is_orthogonal():
    P = polar_factor(_matrix(30, 50))
    torch.testing.assert_close(P @ P.T, torch.eye(30, dtype=torch.float64))


def test_zero_and_rank_deficient_inputs_stay_finite():
    zero = torch.zeros(16, 32)
    assert torch.equal(newton_schulz(zero, 5), zero)
    rank_one = torch.outer(torch.randn(16), torch.randn(32))
    out = newton_schulz(rank_one, 5)
    assert torch.isfinite(out).all()
    assert torch.linalg.matrix_rank(out.double(), rtol=1e-4) == 1


def test_bad_arguments_raise_with_names():
    with pytest.raises(ValueError, match=r"ns_coefficients must be one of \['quintic', 'polar_express'\]"):
        coefficient_schedule("cubic", 5)
    with pytest.raises(ValueError, match="ns_steps must be >= 1"):
        coefficient_schedule("quintic", 0)
    with pytest.raises(ValueError, match="needs a matrix"):
        newton_schulz(torch.randn(5), 5)
