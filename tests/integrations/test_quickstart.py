"""The quickstart pipeline end to end on a tiny configuration (the real one runs for minutes)."""

import json

from archopt_plugins.cli import main
from archopt_plugins.recipe.data import load_stdlib_corpus
from archopt_plugins.recipe.quickstart import run_quickstart
from archopt_plugins.recipe.training import ModelConfig, TrainConfig


def test_corpus_split_is_by_file_and_deterministic():
    a = load_stdlib_corpus(max_bytes=300_000)
    b = load_stdlib_corpus(max_bytes=300_000)
    assert a.files_train > 10 and a.files_val > 10
    assert a.train.numel() >= 300_000 and a.train.dtype.itemsize == 1
    assert (a.train == b.train).all() and (a.val == b.val).all()


def test_quickstart_trains_both_and_writes_report(tmp_path, capsys):
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, warmup_steps=2, eval_every=3, eval_batches=1)
    model = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    histories = run_quickstart(tmp_path, cfg, model, progress=False, max_bytes=200_000)
    assert set(histories) == {"archopt muon", "adamw"}
    for h in histories.values():
        assert h.eval_steps == [3, 6] and len(h.train_loss) == 6
    out = capsys.readouterr().out
    assert "ArchOpt plan 'muon'" in out and "steps to AdamW final val" in out
    assert (tmp_path / "loss.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "histories.json").read_text())
    assert saved["train"]["steps"] == 6


def test_cli_plan_prints_the_plan(capsys):
    assert main(["plan", "muon"]) == 0
    assert "available optimizers: adamw, muon" in capsys.readouterr().out
