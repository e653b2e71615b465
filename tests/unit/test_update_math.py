"""Muon and AdamW as run by ArchOpt against fp64 references and against torch.optim's own optimizers."""

import math

import pytest
import torch

from archopt_plugins import build_optimizer
from archopt_plugins.update.adamw import adamw_reference_step
from archopt_plugins.update.muon import lr_scale, muon_reference_step


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


MUON_CASES = [
    dict(nesterov=True, weight_decay=0.0, lr_scaling="shape", ns_coefficients="quintic"),
    dict(nesterov=False, weight_decay=0.1, lr_scaling="spectral", ns_coefficients="quintic"),
    dict(nesterov=True, weight_decay=0.05, lr_scaling="match_adamw", ns_coefficients="polar_express"),
]


@pytest.mark.parametrize("case", MUON_CASES)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_muon_fp32_matches_fp64_reference(case, shape):
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    W = torch.nn.Parameter(W0.clone())
    opt = build_optimizer([W], "muon", lr=0.02, momentum=0.9, ns_steps=5, compute_dtype="float32", **case)
    ref_W, ref_B = W0.double(), torch.zeros(shape, dtype=torch.float64)
    for g in _grads(shape, 5):
        W.grad = g.clone()
        opt.step()
        ref_W, ref_B = muon_reference_step(ref_W, g, ref_B, lr=0.02, momentum=0.9, ns_steps=5, **case)
    assert float((W.detach().double() - ref_W).norm() / ref_W.norm()) < 1e-6
    buf = opt.state[W]["momentum_buffer"]
    assert float((buf.double() - ref_B).norm() / ref_B.norm()) < 1e-6


@pytest.mark.parametrize("scaling,torch_fn", [("shape", "original"), ("match_adamw", "match_rms_adamw")])
def test_muon_agrees_with_torch_optim_muon(scaling, torch_fn):
    """torch.optim.Muon orthogonalizes in bf16, so agreement is loose (bf16 rounding), not bitwise."""
    shape = (32, 48)
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ours, theirs = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = build_optimizer([ours], "muon", lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True,
                          lr_scaling=scaling, compute_dtype="bfloat16")
    ref = torch.optim.Muon([theirs], lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=torch_fn)
    for g in _grads(shape, 6, seed=2):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    moved = (theirs.detach() - W0).norm()
    assert float((ours.detach() - theirs.detach()).norm() / moved) < 2e-2


def test_lr_scale_modes():
    assert lr_scale(64, 16, "shape") == 2.0 and lr_scale(16, 64, "shape") == 1.0
    assert lr_scale(16, 64, "spectral") == 0.5
    assert math.isclose(lr_scale(16, 64, "match_adamw"), 0.2 * 8)
    with pytest.raises(ValueError, match="lr_scaling must be one of"):
        lr_scale(2, 2, "other")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_adamw_and_fp64_reference(weight_decay):
    shape = (7, 5)
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    ours, theirs = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt = build_optimizer([ours], "adamw", **hp)
    ref = torch.optim.AdamW([theirs], foreach=True, **hp)
    W64, m, v = W0.double(), torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for t, g in enumerate(_grads(shape, 8, seed=4), start=1):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        W64, m, v = adamw_reference_step(W64, g, m, v, t, **hp)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    assert float((ours.detach().double() - W64).norm() / W64.norm()) < 1e-6
