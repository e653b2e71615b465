"""DeepSpeed adapter pieces that need no launch: type names, ds_config params, refusals, the missing-
registration message, the version gate, planning at real shapes, and fragment maps that must not map."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from archopt_plugins import available_optimizers  # noqa: E402
from archopt_plugins.integrations import deepspeed as archopt_ds  # noqa: E402
from archopt_plugins.integrations.deepspeed.config import hparams_from_block, refusals  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402


def test_one_type_per_name_as_design_fixes_them():
    types = archopt_ds.type_names()
    assert sorted(types.values()) == available_optimizers()
    assert archopt_ds.type_name("muon") == "ArchOptMuon"
    assert archopt_ds.type_name("one_sided_shampoo") == "ArchOptOneSidedShampoo"
    assert archopt_ds.type_name("soap") == "ArchOptSoap"
    with pytest.raises(ValueError, match=r"did you mean 'ArchOptMuon'\? types are case-sensitive"):
        archopt_ds.archopt_name("ArchoptMuon")


def test_params_block_keeps_json_strings_and_refuses_deepspeed_adam_keys():
    block = {"type": "ArchOptMuon", "params": {"lr": "0.02", "compute_dtype": "float32",
                                               "overrides": '{"embedding": {"lr": 0.001}}'}}
    hp = hparams_from_block(block)
    assert hp["compute_dtype"] == "float32" and hp["overrides"] == {"embedding": {"lr": 0.001}}
    entries = {e.fqn: e for e in archopt_ds_plan(tiny_llama(), **hp)}
    assert entries["model.layers.0.mlp.up_proj.weight"].hparams["lr"] == 0.02  # "0.02" typed by the planner
    assert entries["model.embed_tokens.weight"].hparams["lr"] == 0.001
    with pytest.raises(ValueError, match=r"params key 'torch_adam' is a DeepSpeed Adam setting"):
        hparams_from_block({"type": "ArchOptMuon", "params": {"torch_adam": True}})
    with pytest.raises(ValueError, match=r"'max_grad_norm'.*gradient_clipping"):
        hparams_from_block({"type": "ArchOptMuon", "params": {"max_grad_norm": 1.0}})


def test_refusals():
    with pytest.raises(ValueError, match=r"offload_optimizer.device='nvme'.*remove \"offload_optimizer\""):
        refusals({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, "ArchOptMuon")
    with pytest.raises(ValueError, match=r"elastic_checkpoint=true.*save_resharded"):
        refusals({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "ArchOptMuon")
    refusals({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}, "ArchOptMuon")


def test_missing_registration_says_what_to_add():
    archopt_ds.disable()
    config = {"optimizer": {"type": "ArchOptMuon", "params": {"lr": 0.02}}}
    with pytest.raises(RuntimeError, match=r"(?s)not enabled.*archopt_ds.enable\(\)"):
        archopt_ds.check_config(config)
    try:
        assert archopt_ds.enable() == sorted(archopt_ds.type_names())
        assert archopt_ds.is_enabled()
        archopt_ds.check_config(config)  # enabled: fine
        archopt_ds.check_config({"optimizer": {"type": "AdamW"}})  # not ours: nothing to say
    finally:
        archopt_ds.disable()
    assert not archopt_ds.is_enabled()


def test_version_gate():
    from archopt_plugins.integrations.deepspeed.registration import check_deepspeed_version

    assert check_deepspeed_version("0.19.8") == "0.19.8"
    with pytest.raises(archopt_ds.UnsupportedDeepSpeedVersion, match=r"supports deepspeed >=0.19,<0.20"):
        check_deepspeed_version("0.16.1")


def test_plan_uses_real_shapes_of_zero3_placeholders():
    """zero.Init leaves (0,)-shaped placeholders with ds_shape; roles and planned shapes must not change."""
    from archopt_plugins.integrations.deepspeed.planning import plan_for_engine

    model = tiny_llama()
    expected = {e.fqn: (e.role, e.shape, e.rule) for e in archopt_ds_plan(model)}
    kept = {}
    for p in model.parameters():  # what ZeRO-3 leaves on a rank: a flat placeholder and the real shape
        p.ds_shape = p.shape
        kept[id(p)] = p.data
        p.data = torch.empty(0)
    plan, tensors = plan_for_engine(model, model.parameters(), "muon", {})
    assert {e.fqn: (e.role, e.shape, e.rule) for e in plan.entries} == expected
    assert all(p.shape == (0,) for p in model.parameters())  # placeholders given back
    with pytest.raises(ValueError, match=r"parameter 'model.norm.weight' is trainable in the model but not among"):
        plan_for_engine(model, [p for n, p in model.named_parameters() if n != "model.norm.weight"], "muon", {})
    with pytest.raises(ValueError, match=r"param group with settings \['weight_decay'\]"):
        plan_for_engine(model, [{"params": list(model.parameters()), "weight_decay": 0.0}], "muon", {})


def archopt_ds_plan(model, **hp):
    from archopt_plugins import plan

    return plan(model, "muon", **hp).entries


class _Address:
    def __init__(self, start, numel):
        self.start, self.numel = start, numel


class _Mapping:
    def __init__(self, group, hp, lp):
        self.param_group_index = group
        self.hp_fragment_address, self.lp_fragment_address = hp, lp


def test_fragment_maps_that_do_not_add_up_raise_naming_the_parameter():
    from archopt_plugins.integrations.deepspeed.fragments import FragmentBridge, _hp_mapped_units

    w = torch.nn.Parameter(torch.zeros(4, 6))
    flat = torch.zeros(30)
    names = {id(w): "layer.weight"}
    w._hp_mapping = _Mapping(0, _Address(2, 10), _Address(14, 10))  # elements 14..24 of 24: fine
    units = _hp_mapped_units(object(), [[w]], [flat], names, [None])
    bridge = FragmentBridge(object(), units, ["layer.weight"], {"layer.weight": 24})
    assert bridge.ranges["layer.weight"].start == 14 and bridge.ranges["layer.weight"].stop == 24
    w._hp_mapping = _Mapping(0, _Address(25, 10), _Address(14, 10))  # past the end of the buffer
    units = _hp_mapped_units(object(), [[w]], [flat], names, [None])
    with pytest.raises(ValueError, match=r"parameter 'layer.weight': cannot map DeepSpeed's flat partition"):
        FragmentBridge(object(), units, ["layer.weight"], {"layer.weight": 24})
    w._hp_mapping = _Mapping(1, _Address(0, 4), _Address(0, 4))
    with pytest.raises(ValueError, match=r"'layer.weight'.*points at group 1, not 0"):
        _hp_mapped_units(object(), [[w]], [flat], names, [None])
    del w._hp_mapping
    with pytest.raises(ValueError, match=r"'layer.weight'.*has no _hp_mapping"):
        _hp_mapped_units(object(), [[w]], [flat], names, [None])


def test_checkpoint_of_another_partition_is_refused_naming_the_parameter():
    from archopt_plugins.integrations.deepspeed.fragments import FragmentBridge

    opt = archopt_ds.DeepSpeedArchOpt(tiny_llama(), "muon")
    fqns = [n for g in opt.param_groups for n in g["param_names"]]
    opt.bridge = FragmentBridge(object(), [], fqns, {})  # this rank holds nothing of any parameter
    saved = opt.state_dict()
    assert saved["archopt_pieces"]["model.norm.weight"] == (0, 0)
    opt.load_state_dict(saved)  # the same partitioning loads
    saved["archopt_pieces"]["model.norm.weight"] = (0, 16)
    saved["archopt_world_size"] = 4
    with pytest.raises(ValueError, match=r"parameter 'model.norm.weight': this rank's checkpoint holds its elements "
                                         r"0:16, this run partitions it as 0:0 \(saved at world size 4\).*save_resharded"):
        opt.load_state_dict(saved)
