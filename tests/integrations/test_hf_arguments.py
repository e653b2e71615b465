"""--optim archopt_* / --optim_args: parsing, typing, validation, enable()/disable(), stack conflicts.

No training here (see test_hf_trainer.py): these build TrainingArguments and parsers only.
"""

import json

import pytest

pytest.importorskip("transformers")

from transformers import HfArgumentParser, TrainingArguments  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

import archopt_plugins as ao  # noqa: E402
from archopt_plugins.integrations.hf import (  # noqa: E402
    UnsupportedTransformersVersion, disable, enable, hf_optimizer_names, is_enabled, parse_optim_args)
from archopt_plugins.integrations.hf.arguments import hparams_from_args  # noqa: E402
from archopt_plugins.integrations.hf.enable import check_transformers_version  # noqa: E402


@pytest.fixture
def enabled():
    enable()
    yield
    disable()


def targs(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)


# -- --optim_args parsing ----------------------------------------------------------------------------

def test_parse_optim_args_keeps_commas_inside_values():
    assert parse_optim_args("momentum=0.95, ns_steps=5") == {"momentum": "0.95", "ns_steps": "5"}
    assert parse_optim_args("adamw_betas=0.9,0.95,ns_coefficients=polar_express") == {
        "adamw_betas": "0.9,0.95", "ns_coefficients": "polar_express"}
    assert parse_optim_args("adamw_betas=(0.9, 0.95)") == {"adamw_betas": "(0.9,0.95)"}
    assert parse_optim_args(None) == {} and parse_optim_args("  ") == {}


@pytest.mark.parametrize("text, message", [
    ("0.95", r"not of the form key=value"),
    ("momentum=0.9,momentum=0.95", r"'momentum' is given twice"),
    ("mo-mentum=1", r"not a hyperparameter name"),
])
def test_parse_optim_args_rejects_malformed_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_optim_args(text)


# -- enable() ------------------------------------------------------------------------------------------

def test_enable_adds_every_available_name_and_disable_removes_them():
    assert not is_enabled()
    names = enable()
    try:
        assert names == [f"archopt_{n}" for n in ao.available_optimizers()] == hf_optimizer_names()
        assert enable() == names  # idempotent
        values = [m.value for m in OptimizerNames]
        assert all(values.count(n) == 1 for n in names)
    finally:
        disable()
    assert not is_enabled()
    assert not any(m.value.startswith("archopt_") for m in OptimizerNames)
    with pytest.raises(ValueError, match="is not a valid OptimizerNames"):
        OptimizerNames("archopt_muon")


@pytest.mark.parametrize("name", ao.available_optimizers())
def test_every_available_name_parses_from_the_command_line(enabled, tmp_path, name):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", f"archopt_{name}", "--learning_rate", "0.01",
         "--report_to", "none"])
    assert args.optim.value == f"archopt_{name}"
    got_name, hp = hparams_from_args(args)
    assert got_name == name and hp["lr"] == 0.01


def test_python_training_arguments_accept_archopt_names(enabled, tmp_path):
    args = targs(tmp_path, optim="archopt_muon", optim_args="momentum=0.9,ns_steps=3,compute_dtype=fp32",
                 learning_rate=0.02, weight_decay=0.1)
    name, hp = hparams_from_args(args)
    assert name == "muon"
    assert hp == {"momentum": "0.9", "ns_steps": "3", "compute_dtype": "fp32", "lr": 0.02, "weight_decay": 0.1}
    # strings become typed, validated values in the plan
    entry = next(e for e in ao.plan(_tiny(), "muon", **hp).entries if e.rule == "muon")
    assert entry.hparams["momentum"] == 0.9 and entry.hparams["ns_steps"] == 3
    assert entry.hparams["compute_dtype"] == "float32" and entry.hparams["weight_decay"] == 0.1


def _tiny():
    from tiny_models import tiny_llama

    return tiny_llama()


def test_unknown_archopt_name_lists_the_valid_ones(enabled, tmp_path):
    with pytest.raises(ValueError, match=r"unknown archopt optimizer --optim 'archopt_nope'.*archopt_muon"):
        targs(tmp_path, optim="archopt_nope")


def test_unknown_archopt_name_on_the_command_line_shows_the_choices(enabled, tmp_path, capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "archopt_nope"])
    err = capsys.readouterr().err
    assert "invalid choice: 'archopt_nope'" in err and "'archopt_muon'" in err


@pytest.mark.parametrize("optim_args, message", [
    ("momentun=0.9", r"unknown hyperparameter 'momentun' for optimizer 'muon'; valid: \[.*'momentum'"),
    ("ns_steps=0", r"ns_steps.*invalid value '0'; expected a positive integer"),
    ("compute_dtype=int8", r"compute_dtype.*'int8'"),
    ("lr=0.1", r"--optim_args sets 'lr', which the Trainer flag --learning_rate sets"),
    ("weight_decay=0.1", r"--weight_decay"),
    ("overrides=x", r"cannot carry 'overrides'"),
])
def test_bad_optim_args_fail_when_the_arguments_are_built(enabled, tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=message):
        targs(tmp_path, optim="archopt_muon", optim_args=optim_args)


def test_adam_flags_map_to_the_adamw_the_name_runs(enabled, tmp_path):
    _, hp = hparams_from_args(targs(tmp_path, optim="archopt_adamw", adam_beta2=0.95, adam_epsilon=1e-6))
    assert hp["betas"] == (0.9, 0.95) and hp["eps"] == 1e-6
    _, hp = hparams_from_args(targs(tmp_path, optim="archopt_muon"))  # Trainer defaults: aux AdamW keeps its own
    assert "adamw_betas" not in hp and "adamw_eps" not in hp
    _, hp = hparams_from_args(targs(tmp_path, optim="archopt_muon", adam_beta2=0.98))
    assert hp["adamw_betas"] == (0.9, 0.98)
    with pytest.raises(ValueError, match=r"'betas', which the Trainer flag --adam_beta1/--adam_beta2 sets"):
        targs(tmp_path, optim="archopt_adamw", optim_args="betas=0.9,0.95")


def test_version_check_refuses_other_transformers_versions():
    assert check_transformers_version("5.23.0") == "5.23.0"
    for version in ("4.56.2", "5.1.0", "6.0.0"):
        with pytest.raises(UnsupportedTransformersVersion, match=rf"supports transformers .*found {version}.*"
                                                                   r"ArchOptTrainingArguments and ArchOptTrainer"):
            check_transformers_version(version)


# -- the stack: DeepSpeed precedence, FSDP1 ---------------------------------------------------------------

DS_WITH_OPTIMIZER = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


@pytest.mark.parametrize("route", ["enable", "subclass"])
def test_ds_config_optimizer_block_conflicts_and_a_missing_block_is_written(tmp_path, route):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_WITH_OPTIMIZER))
    if route == "enable":
        enable()
        make = TrainingArguments
    else:
        from archopt_plugins.integrations.hf import ArchOptTrainingArguments as make
    try:
        for ds in (DS_WITH_OPTIMIZER, str(path)):
            with pytest.raises(ValueError, match=r"--optim archopt_muon conflicts with the DeepSpeed config's "
                                                 r"\"optimizer\" block \(type 'AdamW'\).*silently ignore --optim"):
                make(output_dir=str(tmp_path), optim="archopt_muon", deepspeed=ds, report_to="none")
        # without an "optimizer" block, --optim writes the ArchOpt<Name> block DeepSpeed builds
        no_block = {k: v for k, v in DS_WITH_OPTIMIZER.items() if k != "optimizer"}
        routed = make(output_dir=str(tmp_path), optim="archopt_muon", deepspeed=dict(no_block), report_to="none",
                      learning_rate=0.02, optim_args="ns_steps=4", use_cpu=True)
        block = routed.hf_deepspeed_config.config["optimizer"]
        assert block["type"] == "ArchOptMuon"
        assert block["params"]["lr"] == 0.02 and str(block["params"]["ns_steps"]) == "4"  # as --optim_args gave it
        assert "optimizer" not in no_block  # the caller's dict is left as it was
        with pytest.raises(ValueError, match=r"with FSDP1 \(fsdp_config version 1\) is not supported"):
            make(output_dir=str(tmp_path), optim="archopt_muon", fsdp=True, fsdp_config={"version": 1},
                 report_to="none")
        fsdp2 = make(output_dir=str(tmp_path), optim="archopt_muon", fsdp=True, report_to="none")  # the engine's
        assert fsdp2.fsdp is True
    finally:
        disable()


def test_subclass_arguments_work_without_enable(tmp_path):
    from archopt_plugins.integrations.hf import ArchOptTrainingArguments

    assert not is_enabled()
    (args,) = HfArgumentParser(ArchOptTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "archopt_muon", "--optim_args", "ns_steps=4",
         "--report_to", "none"])
    assert args.optim == "archopt_muon" and hparams_from_args(args)[1]["ns_steps"] == "4"
    stock = ArchOptTrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", report_to="none")
    assert stock.optim is OptimizerNames.ADAMW_TORCH
    with pytest.raises(ValueError, match=r"unknown archopt optimizer --optim 'archopt_nope'.*archopt_muon"):
        ArchOptTrainingArguments(output_dir=str(tmp_path), optim="archopt_nope", report_to="none")
    with pytest.raises(ValueError, match="is not a valid OptimizerNames"):
        ArchOptTrainingArguments(output_dir=str(tmp_path), optim="not_an_optimizer", report_to="none")
