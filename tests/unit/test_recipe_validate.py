"""Recipe validation: shipped recipes validate; every rule names its key, value and fix; the CLI exits non-zero."""

import re

import pytest

from archopt_plugins.cli import main
from archopt_plugins.recipe.errors import RecipeError
from archopt_plugins.recipe.validate import apply_sets, load_recipe, parse_yaml, validate_data
from recipe_fixtures import ROOT, tiny, write_recipe

SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in SHIPPED}
    assert "quickstart.yaml" in names and len(SHIPPED) >= 4


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "needs:" in out


def test_tiny_recipe_is_valid():
    recipe = validate_data(tiny())
    assert recipe.grad_accum == 1 and recipe.world_size == 1 and recipe.vocab_size == 256


def _issues(data):
    with pytest.raises(RecipeError) as info:
        validate_data(data)
    return info.value.issues


def _one(data, path, pattern):
    issues = _issues(data)
    hits = [i for i in issues if i.path == path]
    assert hits, f"no issue at {path}: {[str(i) for i in issues]}"
    assert re.search(pattern, str(hits[0])), str(hits[0])
    return hits[0]


CROSS_FIELD = [
    ({"model.num_heads": 3}, "model.num_heads", r"does not divide model.hidden_size = 16.*value: 3.*fix:"),
    ({"model.num_kv_heads": 3, "model.num_heads": 4, "model.hidden_size": 32}, "model.num_kv_heads",
     r"does not divide model.num_heads = 4"),
    ({"model.family": "gpt2", "model.num_kv_heads": 1}, "model.num_kv_heads", r"GPT-2 has no grouped-query"),
    ({"model.family": "mixtral"}, "model.num_experts", r"mixtral \(MoE\) needs it"),
    ({"model.num_experts": 4}, "model.num_experts", r"only mixtral"),
    ({"batch.seq_len": 64}, "batch.seq_len", r"exceeds model.max_seq_len = 32"),
    ({"batch.global_batch_size": 6}, "batch.global_batch_size", r"not a multiple of micro_batch_size"),
    ({"backend.kind": "ddp", "launch.nproc_per_node": 2, "batch.global_batch_size": 4, "batch.micro_batch_size": 4},
     "batch.global_batch_size", r"4 × 2 = 8"),
    ({"backend.kind": "single", "launch.nproc_per_node": 2}, "backend.kind", r"'single' runs one process"),
    ({"backend.kind": "fsdp2"}, "backend.kind", r"'fsdp2' shards over processes but launch asks for 1.*"
     r"nproc_per_node to 2 or more"),
    ({"backend.kind": "hsdp", "backend.shard_degree": 1}, "backend.kind", r"'hsdp' shards over processes"),
    ({"backend.kind": "deepspeed", "backend.zero_stage": 2}, "backend.kind", r"'deepspeed' shards over processes"),
    ({"backend.kind": "deepspeed", "backend.zero_stage": 2, "launch.nproc_per_node": 2, "batch.micro_batch_size": 2},
     "logging.geometry_every", r"does not run under deepspeed.*value: 3.*geometry_every: 0"),
    ({"backend.kind": "deepspeed"}, "backend.zero_stage", r"needs a ZeRO stage"),
    ({"backend.zero_stage": 1}, "backend.zero_stage", r"only applies to backend.kind 'deepspeed'"),
    ({"backend.kind": "megatron", "backend.tensor_parallel": 4, "launch.nproc_per_node": 4,
      "batch.global_batch_size": 4, "batch.micro_batch_size": 4}, "backend.tensor_parallel",
     r"does not divide model.num_heads = 2"),
    ({"backend.kind": "hsdp", "backend.shard_degree": 3, "launch.nproc_per_node": 4, "batch.global_batch_size": 16},
     "backend.shard_degree", r"does not divide the world size 4"),
    ({"backend.device": "cpu", "backend.dist_backend": "nccl"}, "backend.dist_backend", r"NCCL needs CUDA"),
    ({"data.source": "text"}, "data.paths", r"needs files"),
    ({"data.source": "text", "data.paths": ["/nonexistent/*.txt"]}, "data.paths[0]", r"matches no file"),
    ({"data.source": "megatron", "data.paths": ["/nonexistent/corpus"], "evaluation.ood": [],
      "tokenizer.kind": "pretokenized", "tokenizer.vocab_size": 100}, "data.paths[0]", r"corpus.bin does not exist"),
    ({"data.source": "megatron", "data.paths": ["/x"], "evaluation.ood": []}, "tokenizer.kind", r"already tokenized"),
    ({"tokenizer.kind": "bpe"}, "tokenizer.vocab_size", r"at least 300"),
    ({"tokenizer.vocab_size": 512}, "tokenizer.vocab_size", r"exactly 256"),
    ({"evaluation.ood": ["klingon"]}, "evaluation.ood[0]", r"unknown out-of-distribution set.*'klingon'"),
    ({"schedule.warmup_steps": 10}, "schedule.warmup_steps", r"exceeds schedule.steps = 6"),
    ({"optimizer.name": "sgd"}, "optimizer.name", r"unknown optimizer.*'sgd'"),
    ({"optimizer.hparams": {"lr": 0.02, "momentum": 1.5}}, "optimizer.hparams.momentum",
     r"'momentum': invalid value 1.5"),
    ({"optimizer.hparams": {"lrr": 0.02}}, "optimizer.hparams.lrr", r"unknown hyperparameter 'lrr'"),
    ({"optimizer.overrides": {"*.nothing_here": {"lr": 0.1}}}, "optimizer.overrides", r"matches no trainable"),
    ({"baseline.hparams": {"lr": 0.1}}, "baseline.hparams.lr", r"come from baseline.lr_grid"),
    ({"baseline.lr_grid": [1e-3, -1.0]}, "baseline.lr_grid[1]", r"positive finite"),
]


@pytest.mark.parametrize("edits,path,pattern", CROSS_FIELD, ids=[c[1] + ":" + c[2][:20] for c in CROSS_FIELD])
def test_cross_field_rule_names_the_key(edits, path, pattern):
    _one(tiny(**edits), path, pattern)


SCHEMA = [
    ({"model.bogus": 1}, "model.bogus", r"unknown key.*valid keys here: \[.*'hidden_size'"),
    ({"model.num_heads": "four"}, "model.num_heads", r"value: 'four'.*whole number"),
    ({"batch.seq_len": True}, "batch.seq_len", r"value: True"),
    ({"schedule.steps": 0}, "schedule.steps", r"greater than or equal to 1"),
    ({"backend.kind": "horovod"}, "backend.kind", r"'single', 'ddp', 'fsdp2'"),
    ({"launch.slurm.time": "soon"}, "launch.slurm.time", r"value: 'soon'"),
    ({"evaluation.ood": "licenses"}, "evaluation.ood", r"list"),
    ({"model": 5}, "model", r"mapping"),
]


@pytest.mark.parametrize("edits,path,pattern", SCHEMA, ids=[c[1] for c in SCHEMA])
def test_schema_error_names_the_key(edits, path, pattern):
    _one(tiny(**edits), path, pattern)


SHARDED_OK = [
    {"backend.kind": "fsdp2", "launch.nproc_per_node": 2, "batch.micro_batch_size": 2},
    {"backend.kind": "hsdp", "backend.shard_degree": 2, "launch.nproc_per_node": 4, "batch.micro_batch_size": 1},
    {"backend.kind": "deepspeed", "backend.zero_stage": 3, "launch.nproc_per_node": 2, "batch.micro_batch_size": 2,
     "logging.geometry_every": 0},
]


@pytest.mark.parametrize("edits", SHARDED_OK, ids=lambda e: e["backend.kind"])
def test_sharded_backends_validate(edits):
    recipe = validate_data(tiny(**edits))
    assert recipe.backend.kind == edits["backend.kind"] and recipe.world_size >= 2


def test_backend_with_a_missing_module_names_its_extra(monkeypatch):
    import dataclasses

    from archopt_plugins.recipe.backends import BACKENDS

    # deepspeed is installed here: stand its entry on a module that is not, as on a machine without the extra
    missing = dataclasses.replace(BACKENDS["deepspeed"], modules=("archopt_no_such_module",))
    monkeypatch.setitem(BACKENDS, "deepspeed", missing)
    _one(tiny(**SHARDED_OK[2]), "backend.kind",
         r"'deepspeed' needs \['archopt_no_such_module'\], which is not installed.*archopt-plugins\[deepspeed\]")


def test_all_problems_reported_at_once():
    issues = _issues(tiny(**{"model.num_heads": 3, "batch.seq_len": 64, "backend.kind": "fsdp2"}))
    assert {"model.num_heads", "batch.seq_len", "backend.kind"} <= {i.path for i in issues}


def test_yaml_syntax_error_names_line():
    with pytest.raises(RecipeError, match=r"line 3, column 1: expected ',' or ']'"):
        parse_yaml("model:\n  hidden_size: [1, 2\n")


def test_scientific_notation_reads_as_float():
    assert parse_yaml("lr: 1e-3\nx: -2E+2\n") == {"lr": 1e-3, "x": -200.0}


def test_set_edits_and_their_errors():
    data = apply_sets(tiny(), ["schedule.steps=9", "optimizer.hparams.lr=5e-3", "evaluation.ood=[]"])
    recipe = validate_data(data)
    assert recipe.schedule.steps == 9 and recipe.optimizer.hparams["lr"] == 5e-3 and recipe.evaluation.ood == []
    with pytest.raises(RecipeError, match=r"schedule.steps: --set schedule.steps.x.y goes through a value that is not a mapping \(value: 6\)"):
        apply_sets(tiny(), ["schedule.steps.x.y=1"])
    with pytest.raises(RecipeError, match=r"not of the form key.path=value"):
        apply_sets(tiny(), ["schedule.steps"])


def test_cli_validate_exit_status_and_messages(tmp_path, capsys):
    good = write_recipe(tmp_path / "good.yaml", tiny())
    assert main(["validate", str(good), "--set", "schedule.steps=8"]) == 0
    bad = write_recipe(tmp_path / "bad.yaml", tiny(**{"model.num_heads": 3}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.num_heads: does not divide model.hidden_size" in err and "fix:" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert main(["run", str(bad)]) == 2
    assert main(["slurm", str(good), "--set", "backend.kind=fsdp2"]) == 2


def test_load_recipe_resolves_every_default(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"name": "minimal", "model": {"max_seq_len": 256}})
    recipe = load_recipe(path)
    assert recipe.optimizer.name == "muon" and recipe.batch.seq_len == 128 and recipe.backend.kind == "single"
