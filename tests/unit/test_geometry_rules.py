"""Lion, Scion's LMOs and blockwise Adam as ArchOpt runs them, against their fp64 references,
plus the names' role policies and keyword routing."""

import copy
import math

import pytest
import torch

from archopt_plugins import build_optimizer, plan
from archopt_plugins.planner.rules import get_rule
from archopt_plugins.update.blockwise_adam import blockwise_adam_reference_step
from archopt_plugins.update.lion import lion_reference_step
from archopt_plugins.update.scion import scion_reference_step
from tiny_models import tiny_llama, tiny_mixtral


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_lion_matches_fp64_reference(weight_decay):
    shape = (9, 7)
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    W = torch.nn.Parameter(W0.clone())
    hp = dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=weight_decay)
    opt = build_optimizer([W], "lion", **hp)
    ref_W, ref_m = W0.double(), torch.zeros(shape, dtype=torch.float64)
    for g in _grads(shape, 6, seed=2):
        W.grad = g.clone()
        opt.step()
        ref_W, ref_m = lion_reference_step(ref_W, g, ref_m, **hp)
    assert _rel(W.detach(), ref_W) < 1e-6
    assert _rel(opt.state[W]["exp_avg"], ref_m) < 1e-6


def test_lion_moves_every_coordinate_by_lr_and_runs_on_every_parameter():
    W = torch.nn.Parameter(torch.zeros(5, 3))
    opt = build_optimizer([W], "lion", lr=0.25)
    W.grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert torch.equal(W.detach().abs(), torch.full((5, 3), 0.25))
    p = plan(tiny_llama(), "lion")
    assert {e.rule for e in p.entries} == {"lion"}
    assert p.entry("model.norm.weight").hparams["weight_decay"] == 0.0  # norms still take no decay


SCION_CASES = [
    ("scion_spectral", dict(lr_scaling="spectral"), (24, 40)),
    ("scion_spectral", dict(lr_scaling="shape"), (40, 24)),
    ("scion_sign", {}, (24, 40)),
    ("scion_rownorm", {}, (24, 40)),
    ("scion_colnorm", {}, (40, 24)),
]


@pytest.mark.parametrize("rule,extra,shape", SCION_CASES)
def test_scion_lmos_match_fp64_reference(rule, extra, shape):
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    W = torch.nn.Parameter(W0.clone())
    hp = dict(lr=0.01, momentum=0.8, weight_decay=0.5, scale=3.0)
    options = dict(compute_dtype="float32", ns_steps=5, **extra) if rule == "scion_spectral" else {}
    opt = build_optimizer([{"params": [W], "rule": rule}], "scion", **hp, **options)
    assert opt.param_groups[0]["rule"] == rule
    ref_W, ref_d = W0.double(), torch.zeros(shape, dtype=torch.float64)
    lmo = rule.removeprefix("scion_")
    lmo_options = {k: v for k, v in options.items() if k in ("ns_steps", "lr_scaling")}
    for g in _grads(shape, 5, seed=4):
        W.grad = g.clone()
        opt.step()
        ref_W, ref_d = scion_reference_step(ref_W, g, ref_d, lmo, **hp, **lmo_options)
    assert _rel(W.detach(), ref_W) < 1e-6
    assert _rel(opt.state[W]["momentum_buffer"], ref_d) < 1e-6


def test_scion_norm_lmos_normalize_the_stated_axis():
    W = torch.nn.Parameter(torch.zeros(6, 10))
    opt = build_optimizer([{"params": [W], "rule": "scion_rownorm"}], "scion", lr=1.0, momentum=0.0,
                          weight_decay=0.0, scale=1.0)
    W.grad = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    opt.step()
    row_rms = W.detach().pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(row_rms, torch.ones(6))


def test_scion_role_policy():
    tied = plan(tiny_llama(tied=True), "scion")
    assert tied.entry("model.embed_tokens.weight").rule == "scion_sign"  # the table is also the head
    assert tied.entry("model.layers.0.self_attn.q_proj.weight").rule == "scion_spectral"
    assert tied.entry("model.layers.0.mlp.down_proj.weight").rule == "scion_spectral"
    assert tied.entry("model.norm.weight").rule == "adamw"
    untied = plan(tiny_llama(tied=False), "scion")
    assert untied.entry("model.embed_tokens.weight").rule == "scion_rownorm"
    assert untied.entry("lm_head.weight").rule == "scion_sign"
    experts = plan(tiny_mixtral(), "scion")
    assert {e.rule for e in experts.entries if e.role == "expert"} == {"scion_spectral"}
    assert {e.rule for e in experts.entries if e.role == "router"} == {"adamw"}


def test_scion_keyword_routing():
    p = plan(tiny_llama(tied=False), "scion", lr=0.003, scale=20.0, scion_sign_scale=500.0, adamw_lr=1e-3,
             overrides={"embedding": {"rule": "scion_colnorm"}})
    hidden = p.entry("model.layers.0.self_attn.q_proj.weight").hparams
    head = p.entry("lm_head.weight").hparams
    emb = p.entry("model.embed_tokens.weight")
    assert (hidden["lr"], hidden["scale"]) == (0.003, 20.0)
    assert (head["lr"], head["scale"]) == (0.003, 500.0)  # the prefixed keyword wins over plain 'scale'
    assert (emb.rule, emb.hparams["lr"], emb.hparams["scale"]) == ("scion_colnorm", 0.003, 20.0)
    assert p.entry("model.norm.weight").hparams["lr"] == 1e-3
    # order of keywords does not matter for precedence
    q = plan(tiny_llama(), "muon", adamw_lr=1e-3, lr=0.05)
    assert q.entry("model.embed_tokens.weight").hparams["lr"] == 1e-3
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'scion_sign_ns_steps' for optimizer 'scion'"):
        plan(tiny_llama(), "scion", scion_sign_ns_steps=3)


def test_rules_declare_their_needs():
    needs = {name: get_rule(name).needs for name in
             ("lion", "scion_spectral", "scion_sign", "scion_rownorm", "scion_colnorm", "blockwise_adam")}
    assert needs == {"lion": "elementwise", "scion_spectral": "whole_matrix", "scion_sign": "elementwise",
                     "scion_rownorm": "reductions", "scion_colnorm": "reductions", "blockwise_adam": "reductions"}


@pytest.mark.parametrize("block", ["row", "tensor"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_blockwise_adam_matches_fp64_reference(block, shape):
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    W = torch.nn.Parameter(W0.clone())
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = build_optimizer([W], "blockwise_adam", block=block, **hp)
    ref = (W0.double(), torch.zeros(shape, dtype=torch.float64),
           torch.zeros(shape[0] if block == "row" else (), dtype=torch.float64))
    for t, g in enumerate(_grads(shape, 6, seed=6), start=1):
        W.grad = g.clone()
        opt.step()
        ref = blockwise_adam_reference_step(ref[0], g, ref[1], ref[2], t, **hp, block=block)
    assert _rel(W.detach(), ref[0]) < 1e-6
    assert _rel(opt.state[W]["exp_avg_sq"].flatten(), ref[2].flatten()) < 1e-6


def test_blockwise_adam_per_head_matches_reference_and_per_expert_is_per_matrix():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj.weight  # 4 heads of 8 rows
    opt = build_optimizer(model, "blockwise_adam", lr=3e-3, overrides={"attn_q": {"block": "head"}})
    W0 = q.detach().clone()
    ref = (W0.double(), torch.zeros_like(W0, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    for t, g in enumerate(_grads(tuple(q.shape), 3, seed=7), start=1):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        q.grad = g.clone()
        opt.step()
        ref = blockwise_adam_reference_step(ref[0], g, ref[1], ref[2], t, lr=3e-3, betas=(0.9, 0.999), eps=1e-8,
                                            weight_decay=0.01, block="head", head_dim=8)
    assert _rel(q.detach(), ref[0]) < 1e-6
    assert opt.state[q]["exp_avg_sq"].shape == (4, 1, 1)

    moe = tiny_mixtral(experts=4)
    opt = build_optimizer(moe, "blockwise_adam", block="tensor")
    for p in moe.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    experts = [p for n, p in moe.named_parameters() if p.ndim == 3]
    assert experts and all(opt.state[p]["exp_avg_sq"].shape == (4, 1, 1) for p in experts)


def test_blockwise_adam_with_one_coordinate_rows_is_adamw():
    shape = (16, 1)
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    ours, theirs = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = build_optimizer([ours], "blockwise_adam", **hp)
    ref = torch.optim.AdamW([theirs], foreach=True, **hp)
    for g in _grads(shape, 5, seed=9):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


def test_blockwise_adam_policy_and_errors():
    model = tiny_llama()
    p = plan(model, "blockwise_adam", lr=2e-3)
    assert p.entry("model.embed_tokens.weight").rule == "blockwise_adam"
    norm = p.entry("model.norm.weight")
    assert (norm.rule, norm.hparams["lr"], norm.hparams["betas"]) == ("adamw", 2e-3, (0.9, 0.999))
    with pytest.raises(ValueError, match=r"parameter 'model.embed_tokens.weight' \(role 'embedding'\): "
                                         r"block='head' needs the parameter's attention heads"):
        plan(model, "blockwise_adam", block="head")
    # Muon's per-head switch leaves matrices without heads whole instead.
    p = plan(model, "muon", per_head=True)
    assert p.entry("model.layers.0.self_attn.k_proj.weight").structure.per_head
    assert not p.entry("model.layers.0.mlp.gate_proj.weight").structure.per_head


def test_blockwise_second_moment_of_another_block_setting_is_refused():
    W = torch.nn.Parameter(torch.randn(6, 4))
    opt = build_optimizer([W], "blockwise_adam", block="row")
    W.grad = torch.randn(6, 4)
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state tensors
    state["state"][0]["exp_avg_sq"] = torch.zeros(1, 1, 1)
    with pytest.raises(ValueError, match=r"parameter 'group0.param0': checkpoint state 'exp_avg_sq' has shape "
                                         r"\(1, 1, 1\), but rule 'blockwise_adam' keeps \(1, 6, 1\)"):
        build_optimizer([W], "blockwise_adam", block="row").load_state_dict(state)
    opt.param_groups[0]["block"] = "tensor"  # changed under a live optimizer
    with pytest.raises(ValueError, match=r"parameter 'group0.param0': its blockwise second moment has shape"):
        opt.step()


@pytest.mark.parametrize("name,bytes_per_param", [("lion", 4.0), ("scion", 4.0)])
def test_state_is_four_bytes_per_parameter(name, bytes_per_param):
    p = plan([torch.nn.Parameter(torch.randn(64, 32))], name)
    from archopt_plugins.planner.summary import entry_state_bytes

    assert entry_state_bytes(p.entries[0]) / p.entries[0].numel == bytes_per_param
    b = plan([torch.nn.Parameter(torch.randn(64, 32))], "blockwise_adam").entries[0]
    assert math.isclose(entry_state_bytes(b) / b.numel, 4 + 4 / 32)
