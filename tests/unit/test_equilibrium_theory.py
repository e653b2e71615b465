"""The monitor against the theory on a synthetic scale-invariant model where the theory is exact.

The loss ⟨u_t, w/‖w‖⟩ with u_t a fresh unit vector orthogonal to w_t has gradient g_t = u_t/‖w_t‖:
orthogonal to w (scale invariance) with ‖g_t‖·‖w_t‖ = 1 exactly. SGD with weight decay then obeys
    ‖w_{t+1}‖² = (1−ηλ)²‖w_t‖² + η²/‖w_t‖²,   tan(angle_t) = η/((1−ηλ)‖w_t‖²)
whose fixed point gives the exact equilibrium angle atan(√(2ηλ − η²λ²)/(1−ηλ)) = √(2ηλ)·(1 + O(ηλ)).
"""

import math

import pytest
import torch
from torch import nn

from archopt_plugins import build_optimizer
from archopt_plugins.monitor import GeometryMonitor


class NormalizedWeight(nn.Module):
    """A weight used only through w/‖w‖ (the loss is ⟨u, w/‖w‖⟩): exactly scale-invariant."""

    def __init__(self, rows=8, cols=16, scale=1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(scale * torch.randn(rows, cols, generator=gen, dtype=torch.float64))

    def forward(self, u):
        return (u * self.weight / self.weight.norm()).sum()


def _orthogonal_unit(w, gen):
    u = torch.randn(w.shape, generator=gen, dtype=w.dtype)
    u -= (u * w).sum() / (w * w).sum() * w
    return u / u.norm()


def _train(model, opt, steps, every=1):
    monitor = GeometryMonitor(opt, every=every)
    gen = torch.Generator().manual_seed(1)
    trace = []
    for _ in range(steps):
        model(_orthogonal_unit(model.weight.detach(), gen)).backward()
        monitor.before_step()
        opt.step()
        opt.zero_grad()
        metrics = monitor.after_step()
        if metrics:
            trace.append(metrics)
    return trace


def test_sgd_reaches_the_exact_equilibrium_angle_and_the_first_order_prediction():
    lr, wd = 0.1, 0.1  # ηλ = 0.01: the norm relaxes over ~1/(ηλ) = 100 steps
    exact = math.atan(math.sqrt(2 * lr * wd - (lr * wd) ** 2) / (1 - lr * wd))
    model = NormalizedWeight(scale=1.0)  # ‖w‖² = 128: far from the equilibrium norm² 0.7
    opt = torch.optim.SGD([model.weight], lr=lr, weight_decay=wd)
    trace = _train(model, opt, steps=900)
    first, last = trace[0], trace[-1]
    assert abs(first["geometry/group0/angular_update"] / exact - 1) > 0.5  # far away at the start...
    assert last["geometry/group0/angular_update"] == pytest.approx(exact, rel=1e-6)  # ...exact at the end
    predicted = last["geometry/group0/equilibrium_angular_update"]
    assert predicted == pytest.approx(math.sqrt(2 * lr * wd))
    assert predicted == pytest.approx(exact, rel=lr * wd)  # first order in ηλ
    assert last["geometry/group0/equilibrium_steps"] == pytest.approx(1 / (lr * wd))
    assert last["geometry/group0/equilibrium_progress"] == pytest.approx(900 * lr * wd)
    # the effective learning rate η/‖w‖² equals tan(angle)·(1−ηλ) here, at every step
    for m in (first, last):
        assert m["geometry/group0/effective_lr"] == pytest.approx(
            math.tan(m["geometry/group0/angular_update"]) * (1 - lr * wd), rel=1e-9)


def test_spherical_equilibrium_mode_is_at_that_angle_from_the_first_step():
    lr, wd, beta1 = 0.02, 0.05, 0.9
    model = NormalizedWeight(scale=2.0)
    opt = build_optimizer([{"params": [model.weight], "role": "hidden", "param_names": ["w"]}], "spherical",
                          mode="equilibrium", equilibrium_of="adamw", lr=lr, weight_decay=wd, momentum=beta1)
    trace = _train(model, opt, steps=5)
    theta = math.sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))
    for m in trace:
        assert m["geometry/hidden/angular_update"] == pytest.approx(theta, rel=1e-9)
        assert m["geometry/hidden/equilibrium_angular_update"] == pytest.approx(theta, rel=1e-12)
        assert m["geometry/hidden/weight_norm"] == pytest.approx(trace[0]["geometry/hidden/weight_norm"], rel=1e-12)
        assert "geometry/hidden/equilibrium_steps" not in m  # the norm is fixed: nothing to relax
