"""The conformance table: every optimizer name passes the same checks.

A new rule/name adds a row to CASES: (name, hyperparameters, a bad hyperparameter and the error it
must raise). Each check builds the name on a tiny Llama (GQA, tied embeddings) built from a config.
"""

import copy

import pytest
import torch

from archopt_plugins import ArchOpt, NonFiniteGradientError, available_optimizers, build_optimizer
from tiny_models import causal_lm_loss, tiny_llama

CASES = {
    "muon": (dict(lr=0.02, adamw_lr=1e-3, weight_decay=0.01, compute_dtype="float32"),
             dict(ns_steps=0), r"'ns_steps': invalid value 0; expected a positive integer"),
    "adamw": (dict(lr=1e-3, weight_decay=0.01),
              dict(betas=(0.9, 1.5)), r"'betas\[1\]': invalid value 1.5; expected a number in \[0.0, 1.0\)"),
    # Structured preconditioners: small blocks and frequent roots so 3 + 3 resumed steps cross a
    # recomputation and blocking is exercised on the tiny model's 32x64 matrices.
    "shampoo": (dict(lr=3e-3, adamw_lr=1e-3, block_size=16, precondition_frequency=2),
                dict(precondition_frequency=0), r"'precondition_frequency': invalid value 0; expected a positive"),
    "one_sided_shampoo": (dict(lr=3e-3, adamw_lr=1e-3, precondition_frequency=2),
                          dict(matrix_eps=0.0), r"'matrix_eps': invalid value 0.0; expected a number in \(0.0, inf\]"),
    "soap": (dict(lr=3e-3, adamw_lr=1e-3, block_size=16, precondition_frequency=2),
             dict(compute_dtype="bfloat16"), r"'compute_dtype': invalid value 'bfloat16'; expected one of"),
    "adafactor": (dict(lr=3e-3, adamw_lr=1e-3, momentum=0.9),
                  dict(clip_threshold=-1), r"'clip_threshold': invalid value -1; expected a number in \(0.0, inf\]"),
    # The rest of the non-Euclidean family. Scion and Lion set every coordinate's step size directly,
    # so the tests use a small lr; per_head / block="head" exercise the per-head matrix view.
    "lion": (dict(lr=3e-3, weight_decay=0.1),
             dict(betas="0.9"), r"'betas': invalid value '0.9'; expected two numbers in \[0, 1\)"),
    "scion": (dict(lr=1e-3, scion_sign_scale=1000.0, compute_dtype="float32", per_head=True),
              dict(scale=0), r"'scale': invalid value 0; expected a number in \(0.0, inf\]"),
    "blockwise_adam": (dict(lr=1e-2, overrides={"attn_q": {"block": "head"}, "attn_k": {"block": "head"},
                                                "attn_v": {"block": "tensor"}}),
                       dict(block="column"), r"'block': invalid value 'column'; expected one of \['row', 'head'"),
    # Fixed-norm steps on every matrix: per-head blocks on q and the rotational-equilibrium mode on k.
    "spherical": (dict(lr=0.05, adamw_lr=1e-3, compute_dtype="float32",
                       overrides={"attn_q": {"block_rows": 8},
                                  "attn_k": {"mode": "equilibrium", "weight_decay": 0.1}}),
                  dict(mode="sideways"), r"'mode': invalid value 'sideways'; expected one of \['hyperball', 'equi"),
}


def test_table_covers_every_available_optimizer():
    assert sorted(CASES) == available_optimizers()


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param, CASES[request.param]


def _train(model, opt, steps, seed=1):
    losses = []
    for i in range(steps):
        loss = causal_lm_loss(model, seed=seed + i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_init_builds_groups_lazily(case):
    name, (hp, _, _) = case
    model = tiny_llama()
    opt = build_optimizer(model, name, **hp)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, ArchOpt)
    assert not opt.state
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(e.fqn for e in opt.plan.entries)
    assert all({"rule", "lr", "param_names"} <= set(g) for g in opt.param_groups)


def test_step_reduces_loss(case):
    name, (hp, _, _) = case
    model = tiny_llama()
    opt = build_optimizer(model, name, **hp)
    losses = []
    for _ in range(12):  # the same batch again and again: loss must fall
        loss = causal_lm_loss(model, seed=5)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(float(s["step"]) == 12 for s in opt.state.values())


def test_state_dict_round_trip_resumes_bit_exactly(case):
    name, (hp, _, _) = case
    straight = tiny_llama(seed=3)
    opt = build_optimizer(straight, name, **hp)
    _train(straight, opt, 6)

    first = tiny_llama(seed=3)
    opt1 = build_optimizer(first, name, **hp)
    _train(first, opt1, 3)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    assert all(isinstance(k, int) for k in saved_opt["state"])
    assert all("param_names" in g for g in saved_opt["param_groups"])

    resumed = tiny_llama(seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed, name, **hp)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 3, seed=4)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_bf16_params_keep_dtype(case):
    name, (hp, _, _) = case
    model = tiny_llama().to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, name, **hp)
    _train(model, opt, 2)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all(), n
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    for state in opt.state.values():
        assert all(t.dtype == torch.float32 for k, t in state.items() if k != "step")


def test_lr_scheduler_drives_groups_and_lr_zero_with_zero_grads_changes_nothing(case):
    name, (hp, _, _) = case
    model = tiny_llama()
    opt = build_optimizer(model, name, **hp)
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    _train(model, opt, 1)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [b * 0.5 for b in base]
    # torch.distributed.checkpoint initialises state by a step at lr 0 with zero gradients.
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p), n


def test_bad_hyperparameter_error(case):
    name, (hp, bad, message) = case
    with pytest.raises(ValueError, match=message):
        build_optimizer(tiny_llama(), name, **{**hp, **bad})


def test_nonfinite_skip_counts_and_never_poisons_state(case):
    name, (hp, _, _) = case
    model = tiny_llama()
    opt = build_optimizer(model, name, **hp)
    _train(model, opt, 2)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict()["state"])
    causal_lm_loss(model).backward()
    model.model.layers[0].mlp.down_proj.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(params[n], p), n
    for idx, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, state[idx][k])


def test_nonfinite_raise_names_the_parameter(case):
    name, (hp, _, _) = case
    model = tiny_llama()
    opt = build_optimizer(model, name, nonfinite="raise", **hp)
    causal_lm_loss(model).backward()
    model.model.layers[1].self_attn.k_proj.weight.grad.fill_(float("inf"))
    with pytest.raises(NonFiniteGradientError, match=r"'model.layers.1.self_attn.k_proj.weight' has a non-finite"):
        opt.step()
    assert not opt.state


def test_params_without_grad_are_skipped_and_closure_returns_loss(case):
    name, (hp, _, _) = case
    model = tiny_llama()
    opt = build_optimizer(model, name, **hp)
    frozen = model.model.layers[1].mlp.up_proj.weight
    before = frozen.detach().clone()

    def closure():
        opt.zero_grad()
        loss = causal_lm_loss(model)
        loss.backward()
        frozen.grad = None
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(frozen, before) and frozen not in opt.state


def test_load_rejects_a_mismatched_checkpoint(case):
    name, (hp, _, _) = case
    model = tiny_llama()
    opt = build_optimizer(model, name, **hp)
    _train(model, opt, 1)
    other_name = "adamw" if name != "adamw" else "muon"
    other = build_optimizer(tiny_llama(), other_name)
    with pytest.raises(ValueError, match=r"(param groups|rule|at the place of)"):
        other.load_state_dict(opt.state_dict())

    bigger = tiny_llama(hidden=48)
    opt_big = build_optimizer(bigger, name, **hp)
    with pytest.raises(ValueError, match=r"parameter '.*': checkpoint state '.*' has shape"):
        opt_big.load_state_dict(opt.state_dict())

    untied = tiny_llama(tied=False)
    opt_untied = build_optimizer(untied, name, **hp)
    # (Scion gives an untied embedding another rule than a tied one: then the group count differs.)
    with pytest.raises(ValueError, match=r"checkpoint parameter '.*' is at the place of '.*'|has \d+ parameters|"
                                         r"checkpoint has \d+ param groups"):
        opt_untied.load_state_dict(opt.state_dict())
