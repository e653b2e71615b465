"""The spherical rule: fast path against its float64 reference, norms kept per block, exact angles."""

import math

import pytest
import torch
from torch import nn

from archopt_plugins import build_optimizer
from archopt_plugins.monitor import block_angles, blocks
from archopt_plugins.update.equilibrium import equilibrium_angle
from archopt_plugins.update.spherical import spherical_reference_step

BASE = dict(lr=0.05, momentum=0.9, nesterov=True, direction="muon", ns_steps=5, ns_coefficients="quintic",
            block_rows=0, mode="hyperball", weight_decay=0.0, equilibrium_of="muon")


class OneMatrix(nn.Module):
    """One hidden matrix between an input and an output layer (the rule runs on ``proj``)."""

    def __init__(self, rows=16, cols=12, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(4, cols, bias=False)
        self.proj = nn.Linear(cols, rows, bias=False)
        self.out = nn.Linear(rows, 2, bias=False)
        for p in (self.inp.weight, self.out.weight):
            p.requires_grad_(False)

    def forward(self, x):
        return self.out(self.proj(self.inp(x)))


def _run(settings, steps=3, dtype=torch.float32):
    model = OneMatrix().to(dtype)
    w0 = model.proj.weight.detach().clone()
    opt = build_optimizer(model, "spherical", compute_dtype="float32", **settings)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(16, 12, generator=gen) for _ in range(steps)]
    for g in grads:
        model.proj.weight.grad = g.to(dtype)
        opt.step()
    return w0, grads, model.proj.weight.detach()


@pytest.mark.parametrize("overrides", [
    {},
    {"block_rows": 4},
    {"direction": "momentum", "nesterov": False, "block_rows": 2},
    {"mode": "equilibrium", "weight_decay": 0.1, "block_rows": 8},
    {"mode": "equilibrium", "weight_decay": 0.05, "equilibrium_of": "adamw", "direction": "momentum"},
])
def test_fast_path_matches_the_float64_reference(overrides):
    settings = {**BASE, **overrides}
    w0, grads, fast = _run({k: v for k, v in settings.items() if k not in ("ns_steps", "ns_coefficients")})
    W, B = w0.double(), torch.zeros_like(w0, dtype=torch.float64)
    for g in grads:
        W, B = spherical_reference_step(W, g, B, **settings)
    assert torch.linalg.norm(fast.double() - W) / torch.linalg.norm(W) < 2e-5


@pytest.mark.parametrize("block_rows", [0, 1, 4])
def test_every_block_keeps_its_norm(block_rows):
    w0, _, w = _run({"block_rows": block_rows, "lr": 0.2}, steps=5)
    before = torch.linalg.vector_norm(blocks(w0, None, block_rows), dim=1)
    after = torch.linalg.vector_norm(blocks(w, None, block_rows), dim=1)
    assert torch.allclose(before, after, rtol=1e-6)
    assert not torch.allclose(w0, w)  # it did move


def test_equilibrium_mode_turns_each_block_by_exactly_theta_in_float64():
    lr, wd, beta1 = 0.01, 0.1, 0.9
    model = OneMatrix().double()
    opt = build_optimizer(model, "spherical", mode="equilibrium", lr=lr, weight_decay=wd, momentum=beta1,
                          equilibrium_of="adamw", block_rows=4)
    theta = equilibrium_angle("adamw", lr, wd, beta1)
    assert theta == pytest.approx(math.sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1)))
    for step in range(3):
        model.proj.weight.grad = torch.randn(16, 12, dtype=torch.float64)
        before = model.proj.weight.detach().clone()
        opt.step()
        angles = block_angles(blocks(before, None, 4), blocks(model.proj.weight.detach(), None, 4))
        assert torch.allclose(angles, torch.full_like(angles, theta), rtol=1e-9), step


def test_hyperball_turns_by_atan_lr_when_the_direction_is_orthogonal():
    from archopt_plugins.update.spherical import hyperball_step

    w = torch.randn(3, 20, dtype=torch.float64)
    u = torch.randn(3, 20, dtype=torch.float64)
    u -= (u * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
    u /= u.norm(dim=1, keepdim=True)
    new = hyperball_step(w, u, 0.3)
    assert torch.allclose(block_angles(w, new), torch.full((3,), math.atan(0.3), dtype=torch.float64))
    assert torch.allclose(new.norm(dim=1), w.norm(dim=1))


def test_bf16_parameters_keep_their_norm_to_bf16_precision():
    w0, _, w = _run({"block_rows": 4}, dtype=torch.bfloat16)
    assert w.dtype == torch.bfloat16
    ratio = torch.linalg.vector_norm(blocks(w, None, 4), dim=1) / torch.linalg.vector_norm(blocks(w0, None, 4), dim=1)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-2)


def test_loud_errors():
    with pytest.raises(ValueError, match=r"takes no weight decay, got weight_decay=0.1"):
        build_optimizer(OneMatrix(), "spherical", weight_decay=0.1)
    with pytest.raises(ValueError, match=r"mode='equilibrium' turns by .* which is 0 with weight_decay=0"):
        build_optimizer(OneMatrix(), "spherical", mode="equilibrium")
    with pytest.raises(ValueError, match=r"'block_rows': invalid value -2; expected an integer >= 0"):
        build_optimizer(OneMatrix(), "spherical", block_rows=-2)
    with pytest.raises(ValueError, match=r"parameter 'proj.weight'.*block_rows=5 does not divide its 16 rows"):
        build_optimizer(OneMatrix(), "spherical", block_rows=5)
    zero = OneMatrix()
    with torch.no_grad():
        zero.proj.weight[4:8] = 0
    with pytest.raises(ValueError, match=r"parameter 'proj.weight'.*1 block\(s\) of 4 rows are zero.*route it"):
        build_optimizer(zero, "spherical", block_rows=4)


def test_blocks_are_rows_of_the_matrix_view_even_for_a_transposed_layout():
    from tiny_models import causal_lm_loss, tiny_gpt2

    from archopt_plugins.roles.types import ParamStructure

    model = tiny_gpt2()  # GPT-2's Conv1D stores [in, out]: c_attn is [32, 96] holding q, k, v heads of 8 rows
    opt = build_optimizer(model, "spherical", compute_dtype="float32", lr=0.1,
                          overrides={"attn_qkv": {"block_rows": 8}})
    w = model.transformer.h[0].attn.c_attn.weight
    view = ParamStructure(transposed=True)
    norms = torch.linalg.vector_norm(blocks(w, view, 8), dim=1)
    for i in range(2):
        causal_lm_loss(model, seed=i).backward()
        opt.step()
        opt.zero_grad()
    assert torch.allclose(torch.linalg.vector_norm(blocks(w, view, 8), dim=1), norms, rtol=1e-5)


def test_a_block_zeroed_after_planning_is_refused_at_the_step_naming_the_parameter():
    model = OneMatrix()
    opt = build_optimizer(model, "spherical", block_rows=4)
    with torch.no_grad():
        model.proj.weight[:4] = 0
    model.proj.weight.grad = torch.randn(16, 12)
    with pytest.raises(ValueError, match=r"parameter 'proj.weight': rule 'spherical' keeps each block's norm fixed"):
        opt.step()
