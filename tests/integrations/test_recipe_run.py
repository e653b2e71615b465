"""`archopt run` in one process: every run, metrics (JSONL + TensorBoard), checkpoints, --resume, the report."""

import json
import shutil

import torch

from archopt_plugins.cli import main
from archopt_plugins.recipe.history import RunHistory
from archopt_plugins.recipe.report import reach_table
from archopt_plugins.recipe.runner import lr_factor
from archopt_plugins.recipe.schema import ScheduleSection
from recipe_fixtures import tiny, write_recipe


def _final_params(run_dir):
    ckpt = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(ckpt, weights_only=True)["engine"]["model"]


def test_run_trains_every_run_and_writes_the_report(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny())
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ArchOpt plan 'muon'" in printed and "| archopt muon |" in printed and "| adamw lr=0.003 |" in printed
    for run in ("archopt_muon", "adamw_lr=0.001", "adamw_lr=0.003"):
        history = RunHistory.load(out / run / "result.json")
        assert history.finished and history.steps == [1, 2, 3, 4, 5, 6] and history.eval_steps == [3, 6]
        assert set(history.ood_loss) == {"licenses"} and len(history.ood_loss["licenses"]) == 2
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "val_loss" in rows[2]
        assert [p.name for p in sorted((out / run / "checkpoints").glob("*.pt"))] == ["step_00000003.pt",
                                                                                      "step_00000006.pt"]
        assert list((out / "tensorboard" / run).glob("events.out.tfevents.*"))
    report = (out / "report.md").read_text()
    assert "Target: the best baseline's final validation loss" in report and "OOD licenses" in report
    # geometry diagnostics (logging.geometry_every = 3): in the metrics and in the report, per role
    rows = [json.loads(line) for line in (out / "archopt_muon" / "metrics.jsonl").read_text().splitlines()]
    assert "geometry/attn_q/update_rms" in rows[2] and "geometry/attn_q/update_rms" not in rows[1]
    assert "Geometry of archopt muon at its last measurement" in report and "| mlp_in |" in report
    assert (out / "curves.png").stat().st_size > 5000
    # the resolved recipe the run used is saved beside the results
    assert "global_batch_size: 4" in (out / "recipe.yaml").read_text()


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny(**{"baseline.enabled": False}))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    straight = _final_params(out / "archopt_muon")
    straight_history = RunHistory.load(out / "archopt_muon" / "result.json")
    # Interrupt after step 3: keep only the step-3 checkpoint and the metrics written so far.
    (out / "archopt_muon" / "checkpoints" / "step_00000006.pt").unlink()
    (out / "archopt_muon" / "result.json").unlink()
    assert main(["run", str(recipe), "--out", str(out), "--resume"]) == 0
    resumed = _final_params(out / "archopt_muon")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    history = RunHistory.load(out / "archopt_muon" / "result.json")
    assert history.train_loss == straight_history.train_loss and history.val_loss == straight_history.val_loss
    steps = [json.loads(line)["step"] for line in (out / "archopt_muon" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines after the checkpoint were dropped, not duplicated
    # A finished run is skipped on --resume; without --resume it starts afresh.
    shutil.copy(out / "archopt_muon" / "result.json", tmp_path / "keep.json")
    assert main(["run", str(recipe), "--out", str(out), "--resume"]) == 0
    assert (out / "archopt_muon" / "result.json").read_text() == (tmp_path / "keep.json").read_text()


def test_grad_accumulation_matches_the_full_batch(tmp_path):
    """micro 2 × accumulation 2 takes the same steps as micro 4 (the loss is averaged over the global batch)."""
    results = {}
    for micro in (4, 2):
        recipe = write_recipe(tmp_path / f"m{micro}.yaml", tiny(**{
            "batch.micro_batch_size": micro, "baseline.enabled": False, "evaluation.ood": [],
            "logging.tensorboard": False, "schedule.steps": 3, "checkpoint.every_steps": 0}))
        assert main(["run", str(recipe), "--out", str(tmp_path / f"o{micro}")]) == 0
        results[micro] = _final_params(tmp_path / f"o{micro}" / "archopt_muon")
    for key, value in results[4].items():
        torch.testing.assert_close(results[2][key], value, rtol=1e-4, atol=1e-6)


def test_lr_schedule_shapes():
    s = ScheduleSection(steps=100, warmup_steps=10, decay="cosine", final_lr_fraction=0.1)
    assert lr_factor(0, s) == 0.1 and lr_factor(9, s) == 1.0 and abs(lr_factor(99, s) - 0.1) < 1e-3
    lin = ScheduleSection(steps=100, warmup_steps=0, decay="linear", final_lr_fraction=0.0)
    assert abs(lr_factor(50, lin) - 0.5) < 1e-9
    assert lr_factor(70, ScheduleSection(steps=100, warmup_steps=0, decay="constant")) == 1.0


def test_reach_table_ratios():
    main_run = RunHistory("archopt muon", "muon", "main", 100, eval_steps=[10, 20, 30], val_loss=[3.0, 2.0, 1.5],
                          train_seconds=[2.0, 4.0, 6.0])
    slow = RunHistory("adamw lr=0.001", "adamw", "baseline", 100, eval_steps=[10, 20, 30], val_loss=[3.0, 2.6, 2.2],
                      train_seconds=[1.0, 2.0, 3.0])
    worse = RunHistory("adamw lr=0.01", "adamw", "baseline", 100, eval_steps=[10, 20, 30], val_loss=[3.0, 2.8, 2.5],
                       train_seconds=[1.0, 2.0, 3.0])
    target, best, rows = reach_table({h.label: h for h in (main_run, slow, worse)})
    assert target == 2.2 and best == "adamw lr=0.001"
    by = {r.label: r for r in rows}
    assert by["archopt muon"].steps == 20 and abs(by["archopt muon"].step_ratio - 20 / 30) < 1e-12
    assert abs(by["archopt muon"].seconds_ratio - 4.0 / 3.0) < 1e-12 and by["archopt muon"].tokens == 2000
    assert by["adamw lr=0.01"].steps is None


def test_only_runs_the_named_runs_and_refuses_unknown_labels(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny(**{"schedule.steps": 2, "evaluation.ood": [],
                                                          "logging.tensorboard": False}))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--only", "adamw lr=0.003"]) == 0
    assert [p.parent.name for p in sorted(out.glob("*/result.json"))] == ["adamw_lr=0.003"]
    assert main(["run", str(recipe), "--out", str(out), "--only", "adamw lr=9"]) == 2
    assert "--only: --only 'adamw lr=9': no such run in this recipe" in capsys.readouterr().err
