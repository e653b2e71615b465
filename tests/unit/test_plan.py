"""The plan: one entry per parameter, hyperparameter routing, overrides and their errors."""

import pytest
import torch

from archopt_plugins import available_optimizers, build_optimizer, plan
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(tied=True, layers=2)


def test_available_optimizers_lists_names():
    assert {"muon", "adamw"} <= set(available_optimizers())


def test_every_trainable_parameter_exactly_once(llama):
    p = plan(llama, "muon")
    assert len(p.entries) == len({id(t) for t in llama.parameters()})
    assert len({e.fqn for e in p.entries}) == len(p.entries)
    entry = p.entry("lm_head.weight")  # aliases resolve to the tied entry
    assert entry.fqn == "model.embed_tokens.weight"


def test_keyword_routing(llama):
    p = plan(llama, "muon", lr=0.05, momentum=0.9, adamw_lr=1e-3, adamw_betas="0.8,0.9", weight_decay=0.1,
             compute_dtype=torch.float32)
    q = p.entry("model.layers.0.self_attn.q_proj.weight")
    assert (q.rule, q.hparams["lr"], q.hparams["momentum"], q.hparams["weight_decay"]) == ("muon", 0.05, 0.9, 0.1)
    assert q.hparams["compute_dtype"] == "float32"
    emb = p.entry("model.embed_tokens.weight")
    assert (emb.rule, emb.hparams["lr"], emb.hparams["betas"]) == ("adamw", 1e-3, (0.8, 0.9))
    assert p.entry("model.norm.weight").hparams["weight_decay"] == 0.0  # no decay on norms


def test_string_values_are_converted(llama):
    p = plan(llama, "muon", lr="0.01", nesterov="false", ns_steps="6", compute_dtype="bf16")
    q = p.entry("model.layers.1.mlp.up_proj.weight").hparams
    assert (q["lr"], q["nesterov"], q["ns_steps"], q["compute_dtype"]) == (0.01, False, 6, "bfloat16")


def test_overrides_by_role_and_glob(llama):
    p = plan(llama, "muon", overrides={
        "embedding": {"rule": "muon", "lr": 0.001},
        "attn_out": {"rule": "adamw"},
        "*.q_proj.weight": {"lr": 0.07},
        "model.layers.1.*": {"momentum": 0.8},
        "norm": {"weight_decay": 0.01},
    })
    assert p.entry("model.embed_tokens.weight").rule == "muon"
    assert p.entry("model.embed_tokens.weight").hparams["lr"] == 0.001
    assert p.entry("model.layers.0.self_attn.o_proj.weight").rule == "adamw"
    assert p.entry("model.layers.0.self_attn.o_proj.weight").hparams["lr"] == 3e-4  # AdamW-beside-Muon default
    assert p.entry("model.layers.1.self_attn.q_proj.weight").hparams["lr"] == 0.07
    assert p.entry("model.layers.1.self_attn.q_proj.weight").hparams["momentum"] == 0.8
    assert p.entry("model.norm.weight").hparams["weight_decay"] == 0.01


ERRORS = [
    (dict(name="sgd"), r"unknown optimizer 'sgd'; available: \[.*'adamw'.*'muon'"),
    (dict(eps=1e-8), r"unknown hyperparameter 'eps' for optimizer 'muon'; valid: \[.*'adamw_eps'"),
    (dict(momentum=1.5), r"hyperparameter 'momentum': invalid value 1.5; expected a number in \[0.0, 1.0\)"),
    (dict(lr=-1), r"'lr': invalid value -1"),
    (dict(ns_coefficients="cubic"), r"expected one of \['quintic', 'polar_express'\]"),
    (dict(compute_dtype="int8"), r"'compute_dtype': invalid value 'int8'"),
    (dict(nonfinite="ignore"), r"expected one of \['skip', 'raise'\]"),
    (dict(overrides={"attn_z": {"lr": 1}}), r"override FQN pattern 'attn_z' matches no trainable parameter"),
    (dict(overrides={"hidden": {"lr": 1}}), r"override role 'hidden' matches no trainable parameter"),
    (dict(overrides={"embedding": {"rule": "sgd"}}), r"unknown rule 'sgd'; valid rules: \[.*'adamw'.*'muon'.*\]"),
    (dict(overrides={"norm": {"rule": "muon"}}),
     r"parameter 'model.layers.0.input_layernorm.weight' \(role 'norm'\): rule 'muon' needs a tensor of >= 2"),
    (dict(overrides={"embedding": {"momentum": 0.9}}),
     r"override 'embedding': hyperparameter 'momentum' applies to none of the parameters it matches "
     r"\(their rules: \['adamw'\]\); valid for them: \['betas', 'eps'"),
    (dict(overrides={"*.q_proj.*": {"lr": 0.1}, "model.layers.0.*": {"lr": 0.2}}),
     r"parameter 'model.layers.0.self_attn.q_proj.weight' is claimed twice: overrides '\*.q_proj.\*' and "
     r"'model.layers.0.\*'"),
    (dict(overrides=["embedding"]), r"overrides must be a mapping"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS)
def test_errors_name_what_is_wrong(llama, kwargs, message):
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "muon")
    with pytest.raises((ValueError, TypeError), match=message):
        plan(llama, name, **kwargs)


def test_adamw_name_rejects_adamw_prefixed_keys(llama):
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'adamw_lr' for optimizer 'adamw'"):
        build_optimizer(llama, "adamw", adamw_lr=1e-3)


def test_summary_is_a_readable_table(llama):
    text = plan(llama, "muon").summary()
    assert text.startswith("ArchOpt plan 'muon'")
    assert "model.embed_tokens.weight (= lm_head.weight)" in text
    assert "model.layers.{0..1}.self_attn.q_proj.weight" in text
    assert "roles from module structure" in text
    assert "muon" in text.split("totals:")[1] and "adamw" in text.split("totals:")[1]
    full = plan(llama, "muon").summary(collapse_layers=False)
    assert "model.layers.1.self_attn.q_proj.weight" in full


def test_plan_entries_are_frozen(llama):
    e = plan(llama).entries[0]
    with pytest.raises(Exception):
        e.rule = "muon"
    with pytest.raises(TypeError):
        e.hparams["lr"] = 1.0


def test_the_names_own_rule_leads_the_param_groups(llama):
    """Trainers log param_groups[0]["lr"]: under "muon" that must be Muon's learning rate."""
    opt = build_optimizer(llama, "muon", lr=0.03, adamw_lr=1e-3)
    assert opt.param_groups[0]["rule"] == "muon" and opt.param_groups[0]["lr"] == 0.03
