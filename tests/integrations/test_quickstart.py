"""The quickstart (`make quickstart` = `archopt run recipes/quickstart.yaml`) end to end on a tiny edit of it."""

from archopt_plugins import available_optimizers
from archopt_plugins.cli import main
from archopt_plugins.recipe.data import load_stdlib_corpus
from recipe_fixtures import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_corpus_split_is_by_file_and_deterministic():
    a = load_stdlib_corpus(max_bytes=300_000)
    b = load_stdlib_corpus(max_bytes=300_000)
    assert a.files_train > 10 and a.files_val > 10
    assert a.train.numel() >= 300_000 and a.train.dtype.itemsize == 1
    assert (a.train == b.train).all() and (a.val == b.val).all()


def test_make_quickstart_runs_the_quickstart_recipe():
    makefile = (ROOT / "Makefile").read_text()
    assert "archopt run recipes/quickstart.yaml" in makefile


def test_quickstart_recipe_trains_both_and_writes_report(tmp_path, capsys):
    tiny = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.intermediate_size=32", "data.max_bytes=200000", "schedule.steps=6", "schedule.warmup_steps=2",
            "batch.micro_batch_size=2", "batch.global_batch_size=2", "batch.seq_len=16", "evaluation.every_steps=3",
            "evaluation.batches=1", "logging.progress=false", "backend.threads=1"]
    args = ["run", str(QUICKSTART), "--out", str(tmp_path)] + [a for s in tiny for a in ("--set", s)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ArchOpt plan 'muon'" in out and "steps to target" in out and "| archopt muon |" in out
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "report.md").read_text().count("| adamw lr=0.001 |") == 1


def test_cli_plan_prints_the_plan(capsys):
    assert main(["plan", "muon"]) == 0
    assert f"available optimizers: {', '.join(available_optimizers())}" in capsys.readouterr().out
