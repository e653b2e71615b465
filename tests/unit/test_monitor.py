"""GeometryMonitor: metric names, exact values against plain float64 computations, cadence, wrappers."""

import math

import pytest
import torch
from torch import nn

from archopt_plugins import build_optimizer
from archopt_plugins.monitor import GeometryMonitor, block_angles, blocks, power_iteration, write_scalars
from archopt_plugins.roles.types import ParamStructure
from tiny_models import causal_lm_loss, tiny_llama


def _rotate(w: torch.Tensor, theta: float, seed: int = 0) -> torch.Tensor:
    """``w`` turned by exactly ``theta`` radians towards a random direction orthogonal to it (float64)."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    d -= (d * w).sum() / (w * w).sum() * w
    d *= w.norm() / d.norm()
    return math.cos(theta) * w + math.sin(theta) * d


@pytest.mark.parametrize("theta", [1e-5, 1e-3, 0.3, 2.5])
def test_block_angle_is_accurate_at_every_scale_even_in_float32(theta):
    w = torch.randn(6, 10, dtype=torch.float64)
    turned = _rotate(w, theta) * 3.0  # a change of norm does not change the angle
    measured = float(block_angles(blocks(w.float()), blocks(turned.float())))
    assert measured == pytest.approx(theta, rel=2e-3 if theta < 1e-4 else 1e-5)


def test_blocks_follow_the_matrix_view_and_refuse_a_non_divisor():
    w = torch.arange(24.0).reshape(4, 6)
    assert torch.equal(blocks(w, ParamStructure(), 2), w.reshape(2, 12))
    assert torch.equal(blocks(w, ParamStructure(), 0), w.reshape(1, 24))
    stored_in_out = w.T.contiguous()  # GPT-2 Conv1D layout [in, out]: blocks are still rows of W
    assert torch.equal(blocks(stored_in_out, ParamStructure(transposed=True), 2), w.reshape(2, 12))
    with pytest.raises(ValueError, match=r"block_rows=3 does not divide the 4 rows"):
        blocks(w, ParamStructure(), 3)


def test_power_iteration_warm_start_reaches_the_spectral_norm():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(3, 8, 8, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 5, 5, generator=gen, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    mats = u[:, :, :5] @ torch.diag_embed(s.expand(3, 5)) @ v.mT
    sigma, vec = power_iteration(mats, None, iters=1, generator=gen)
    assert (sigma <= 4.0 + 1e-9).all()  # a lower bound at every iteration
    for _ in range(10):
        sigma, vec = power_iteration(mats, vec, iters=2)
    assert torch.allclose(sigma, torch.full((3,), 4.0, dtype=torch.float64), rtol=1e-9)


def _one_step(model, opt, monitor, seed=1):
    loss = causal_lm_loss(model, seed=seed)
    loss.backward()
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone().double() for n, p in model.named_parameters()}
    monitor.before_step()
    opt.step()
    metrics = monitor.after_step()
    opt.zero_grad(set_to_none=True)
    return metrics, before, grads


def test_archopt_metrics_per_role_match_float64_by_hand():
    model = tiny_llama()
    opt = build_optimizer(model, "muon", lr=0.02, weight_decay=0.1, adamw_weight_decay=0.1,
                          compute_dtype="float32")
    monitor = GeometryMonitor(opt, per_param=True)
    metrics, before, grads = _one_step(model, opt, monitor)
    after = {n: p.detach().double() for n, p in model.named_parameters()}
    q = [n for n in after if n.endswith("q_proj.weight")]
    delta2 = sum(float((after[n] - before[n]).pow(2).sum()) for n in q)
    numel = sum(after[n].numel() for n in q)
    assert metrics["geometry/attn_q/update_rms"] == pytest.approx(math.sqrt(delta2 / numel), rel=1e-5)
    assert metrics["geometry/attn_q/grad_norm"] == pytest.approx(
        math.sqrt(sum(float(grads[n].pow(2).sum()) for n in q)), rel=1e-5)
    name = q[0]
    cos = float((before[name] * after[name]).sum() / (before[name].norm() * after[name].norm()))
    per = f"geometry/param/{name}/"
    assert metrics[per + "angular_update"] == pytest.approx(math.acos(min(1.0, cos)), rel=1e-3)
    assert metrics[per + "effective_lr"] == pytest.approx(0.02 / float(before[name].pow(2).sum()), rel=1e-5)
    assert metrics[per + "weight_norm"] == pytest.approx(float(after[name].norm()), rel=1e-5)
    assert metrics[per + "relative_update"] == pytest.approx(
        float((after[name] - before[name]).norm() / before[name].norm()), rel=1e-4)
    # theory beside the measurement: Muon's √(2ηλ), 1/(ηλ), ‖W‖₂·λ/s; AdamW's ‖W‖∞·λ
    assert metrics[per + "equilibrium_angular_update"] == pytest.approx(math.sqrt(2 * 0.02 * 0.1))
    assert metrics[per + "equilibrium_steps"] == pytest.approx(1 / (0.02 * 0.1))
    assert 0 < metrics[per + "spectral_bound"]
    emb = "geometry/param/model.embed_tokens.weight/linf_bound"
    assert metrics[emb] == pytest.approx(float(after["model.embed_tokens.weight"].abs().max()) * 0.1, rel=1e-6)
    for role in ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_out", "embedding", "norm"):
        for metric in ("update_rms", "angular_update", "effective_lr", "grad_norm", "weight_norm"):
            assert math.isfinite(metrics[f"geometry/{role}/{metric}"]), (role, metric)


def test_every_k_steps_and_nothing_in_between():
    model = tiny_llama()
    opt = build_optimizer(model, "adamw", lr=1e-3)
    monitor = GeometryMonitor(opt, every=3)
    got = [bool(_one_step(model, opt, monitor, seed=i)[0]) for i in range(7)]
    assert got == [True, False, False, True, False, False, True]
    assert not any(k.startswith("geometry/param/") for k in _one_step(model, opt, monitor)[0])


def test_skipped_step_reports_nothing():
    model = tiny_llama()
    opt = build_optimizer(model, "muon", compute_dtype="float32")
    monitor = GeometryMonitor(opt)
    causal_lm_loss(model).backward()
    model.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")
    monitor.before_step()
    opt.step()
    assert monitor.after_step() == {}


class _Wrapper:  # what accelerate's AcceleratedOptimizer looks like from outside
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_plain_torch_sgd_through_a_wrapper_gets_group_roles_and_the_sgd_prediction():
    model = nn.Linear(8, 4)
    sgd = torch.optim.SGD([{"params": [model.weight], "weight_decay": 0.01}, {"params": [model.bias]}],
                          lr=0.1, momentum=0.9)
    monitor = GeometryMonitor(_Wrapper(sgd))
    model(torch.randn(5, 8)).square().sum().backward()
    monitor.before_step()
    sgd.step()
    metrics = monitor.after_step()
    assert metrics["geometry/group0/equilibrium_angular_update"] == pytest.approx(math.sqrt(2 * 0.1 * 0.01 / 1.9))
    assert "geometry/group1/update_rms" in metrics and "geometry/group1/equilibrium_steps" not in metrics

    class Sink:
        def __init__(self):
            self.rows = []

        def add_scalar(self, name, value, step):
            self.rows.append((name, value, step))

    sink = Sink()
    write_scalars(sink, metrics, 7)
    assert len(sink.rows) == len(metrics) and all(step == 7 for _, _, step in sink.rows)


def test_bad_arguments_are_loud():
    with pytest.raises(ValueError, match=r"every must be a positive integer"):
        GeometryMonitor(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), every=0)
    with pytest.raises(TypeError, match=r"needs a torch.optim.Optimizer"):
        GeometryMonitor(object())
