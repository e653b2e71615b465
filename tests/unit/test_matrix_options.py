"""Matrix options every matrix rule honours: per-expert batching, conv flattening, per-head views.

The view itself (``update/matrix_view.py``) is checked on every structure kind; then every
registered matrix rule is stepped on a stacked / conv / fused tensor and on the same matrices held
as separate 2-D parameters, and the two must agree.
"""

import pytest
import torch
from torch import nn

from archopt_plugins import build_optimizer, plan
from archopt_plugins.planner.rules import RULES
from archopt_plugins.roles.types import ParamStructure, QKVSplit
from archopt_plugins.update.kernel import MatrixKernel
from archopt_plugins.update.matrix_view import from_matrices, matrix_shape, to_matrices
from archopt_plugins.update.muon import muon_reference_step
from tiny_models import causal_lm_loss, tiny_gpt2

GQA = QKVSplit(num_heads=4, num_kv_heads=2, head_dim=8, layout="concat")
GROUPED = QKVSplit(num_heads=4, num_kv_heads=2, head_dim=8, layout="grouped")

VIEWS = {
    "plain": ((6, 4), ParamStructure()),
    "stored [in,out]": ((4, 6), ParamStructure(transposed=True)),
    "experts": ((3, 6, 4), ParamStructure(batch_dims=1)),
    "experts [E,in,out]": ((3, 4, 6), ParamStructure(batch_dims=1, transposed=True)),
    "conv": ((8, 3, 3, 3), ParamStructure(flatten_kernel=True)),
    "conv transposed": ((3, 8, 3, 3), ParamStructure(flatten_kernel=True, transposed=True)),
    "fused qkv per head": ((64, 32), ParamStructure(qkv=GQA, per_head=True)),
    "fused qkv [in,out] per head": ((32, 64), ParamStructure(transposed=True, qkv=GQA, per_head=True)),
    "grouped qkv per head": ((64, 32), ParamStructure(qkv=GROUPED, per_head=True)),
    "q per head": ((32, 32), ParamStructure(head_dim=8, per_head=True)),
}


@pytest.mark.parametrize("kind", sorted(VIEWS))
def test_view_shape_and_round_trip(kind):
    shape, structure = VIEWS[kind]
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    mats = to_matrices(t, structure)
    assert tuple(mats.shape) == matrix_shape(shape, structure)
    # an update computed on the view lands where the view took it from
    assert torch.equal(from_matrices(mats * 2, structure, shape), t * 2)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("split", [GQA, GROUPED])
def test_per_head_view_cuts_heads_in_storage_order(split, transposed):
    rows = torch.randn(split.rows, 32, generator=torch.Generator().manual_seed(1))  # [fan_out, fan_in]
    stored = rows.T.contiguous() if transposed else rows
    mats = to_matrices(stored, ParamStructure(transposed=transposed, qkv=split, per_head=True))
    assert mats.shape == (split.num_heads + 2 * split.num_kv_heads, 8, 32)
    for h in range(mats.shape[0]):
        assert torch.equal(mats[h], rows[8 * h:8 * (h + 1)])


def test_whole_view_is_unchanged_without_per_head():
    t = torch.randn(64, 32)
    assert to_matrices(t, ParamStructure(qkv=GQA)).shape == (1, 64, 32)
    assert matrix_shape((64, 32), ParamStructure(head_dim=8)) == (1, 64, 32)


MATRIX_RULES = sorted(name for name, rule in RULES.items() if isinstance(rule.kernel, MatrixKernel))


def _fp32(rule: str) -> dict:
    hp = RULES[rule].hparams
    return {"compute_dtype": "float32"} if "compute_dtype" in hp and "auto" in str(hp["compute_dtype"].default) else {}


def _step_same(stacked: torch.Tensor, role: str, matrices: list[torch.Tensor], rule: str, steps: int = 3) -> None:
    """Step ``stacked`` (one tensor of the role) and ``matrices`` (separate hidden matrices) with the
    same gradients viewed both ways."""
    extra = _fp32(rule)
    groups = [{"params": [stacked], "param_names": ["stacked"], "role": role, "rule": rule, **extra},
              {"params": matrices, "param_names": [f"m{i}" for i in range(len(matrices))], "role": "hidden",
               "rule": rule, **extra}]
    opt = build_optimizer(groups, "adamw")
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        g = torch.randn(stacked.shape, generator=gen)
        stacked.grad = g
        pieces = to_matrices(g, opt.plan.entry("stacked").structure)
        for m, piece in zip(matrices, pieces):
            m.grad = piece.reshape(m.shape).clone()
        opt.step()


@pytest.mark.parametrize("rule", MATRIX_RULES)
def test_every_matrix_rule_batches_experts_as_separate_matrices(rule):
    torch.manual_seed(0)
    experts = nn.Parameter(torch.randn(3, 12, 8) * 0.1)
    separate = [nn.Parameter(experts.detach()[e].clone()) for e in range(3)]
    _step_same(experts, "expert", separate, rule)
    for e in range(3):
        torch.testing.assert_close(experts.detach()[e], separate[e].detach(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("rule", MATRIX_RULES)
def test_every_matrix_rule_sees_conv_kernels_flattened(rule):
    torch.manual_seed(0)
    kernel = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
    flat = nn.Parameter(kernel.detach().reshape(8, 27).clone())
    _step_same(kernel, "conv", [flat], rule)
    torch.testing.assert_close(kernel.detach().reshape(8, 27), flat.detach(), rtol=2e-5, atol=2e-6)


class FusedAttention(nn.Module):
    """GQA attention with one fused [q | k | v] projection (the Phi-3 layout)."""

    num_heads, num_key_value_heads, head_dim, hidden_size = 4, 2, 8, 32

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(32, 64, bias=False)
        self.o_proj = nn.Linear(32, 32, bias=False)


class SplitAttention(nn.Module):
    num_heads, num_key_value_heads, head_dim, hidden_size = 4, 2, 8, 32

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32, bias=False)
        self.k_proj = nn.Linear(32, 16, bias=False)
        self.v_proj = nn.Linear(32, 16, bias=False)
        self.o_proj = nn.Linear(32, 32, bias=False)


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn


def _per_head_switch(rule: str) -> dict | None:
    hp = RULES[rule].hparams
    if "block" in hp and hp["block"].convert("block", "head") == "head":  # blockwise Adam: v per head
        return {"block": "head"}
    if "per_head" in hp:
        return {"per_head": True}
    return None


PER_HEAD_RULES = [r for r in MATRIX_RULES if _per_head_switch(r) is not None]


def test_every_matrix_rule_has_a_per_head_switch():
    assert PER_HEAD_RULES == MATRIX_RULES, sorted(set(MATRIX_RULES) - set(PER_HEAD_RULES))


def _run_attention(model: nn.Module, rule: str, switch: dict, grads: dict[str, torch.Tensor]) -> None:
    overrides = {"attn.[qkv]*_proj.weight": {"rule": rule, **switch, **_fp32(rule)}, "attn_out": {"rule": "adamw"}}
    opt = build_optimizer(model, "adamw", overrides=overrides)
    params = dict(model.named_parameters())
    for step in range(3):
        for name, p in params.items():
            p.grad = grads[name] * (step + 1) if name in grads else torch.zeros_like(p)
        opt.step()


@pytest.mark.parametrize("rule", PER_HEAD_RULES)
def test_per_head_update_of_a_fused_gqa_qkv_equals_the_separate_projections(rule):
    torch.manual_seed(0)
    fused, split = Block(FusedAttention()), Block(SplitAttention())
    qkv = fused.attn.qkv_proj.weight
    with torch.no_grad():
        split.attn.q_proj.weight.copy_(qkv[:32])
        split.attn.k_proj.weight.copy_(qkv[32:48])
        split.attn.v_proj.weight.copy_(qkv[48:])
    entry = plan(fused, "muon", per_head=True).entry("attn.qkv_proj.weight")
    assert entry.structure.qkv == QKVSplit(4, 2, 8, "concat") and entry.structure.per_head
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    _run_attention(fused, rule, _per_head_switch(rule), {"attn.qkv_proj.weight": g})
    _run_attention(split, rule, _per_head_switch(rule), {"attn.q_proj.weight": g[:32], "attn.k_proj.weight": g[32:48],
                                                         "attn.v_proj.weight": g[48:]})
    together = torch.cat([split.attn.q_proj.weight, split.attn.k_proj.weight, split.attn.v_proj.weight]).detach()
    torch.testing.assert_close(qkv.detach(), together, rtol=2e-5, atol=2e-6)


def test_per_head_changes_the_muon_update_of_a_fused_qkv():
    """The switch is not a no-op: the whole fused matrix orthogonalized at once differs."""
    results = []
    for per_head in (False, True):
        model = tiny_gpt2(seed=2)
        opt = build_optimizer(model, "muon", per_head=per_head, compute_dtype="float32")
        causal_lm_loss(model).backward()
        opt.step()
        results.append(model.transformer.h[0].attn.c_attn.weight.detach().clone())
    assert (results[0] - results[1]).abs().max() > 1e-4


def test_gpt2_fused_qkv_per_head_muon_matches_fp64_reference_per_head():
    model = tiny_gpt2(seed=1)
    c_attn = model.transformer.h[0].attn.c_attn.weight  # stored [in=32, out=96], 12 heads of 8 rows
    W0 = c_attn.detach().clone()
    hp = dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.1, ns_steps=5)
    opt = build_optimizer(model, "muon", per_head=True, compute_dtype="float32", **hp)
    causal_lm_loss(model).backward()
    G = c_attn.grad.detach().clone()
    opt.step()
    heads = []
    for h in range(12):
        rows = slice(8 * h, 8 * (h + 1))
        W, _ = muon_reference_step(W0.T[rows], G.T[rows], torch.zeros(8, 32), ns_coefficients="quintic",
                                   lr_scaling="shape", **hp)
        heads.append(W)
    expected = torch.cat(heads).T
    assert float((c_attn.detach().double() - expected).norm() / expected.norm()) < 1e-6
