"""The fsdp2, hsdp and deepspeed recipe backends end to end, against the ddp backend, in ONE world-4 launch.

``cases_recipe.py`` runs ``run_recipe`` for each backend on the tiny recipe (global batch 8 = micro 1
× 4 ranks × accumulation 2; 2 evaluation batches over 4 ranks) after a DDP reference run of the same
recipe. Same seed, same batches, same initial weights, fp32 Newton-Schulz: the final parameters must
match DDP's to reduction-order tolerance (5e-5 after 6 steps, as the sharding engine's parity bar),
and a run interrupted at step 4 and resumed from its step-3 checkpoint must end bitwise equal to
the uninterrupted one. The launch takes 35-55 s on a 2-core machine (cases ~35 s, start-up the rest).
"""

from __future__ import annotations

import pytest

from launcher import launch, result

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

CASES = ["recipe_ddp", "recipe_fsdp2", "recipe_hsdp", "recipe_deepspeed_zero2", "recipe_deepspeed_zero3"]
BAR = 5e-5  # relative, per parameter (tests/distributed/test_engine.py's PARITY_BAR)
LOSS_GAP = 1e-5  # absolute, every logged train and validation loss


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe_world4")
    launch(4, CASES, out, tmp_path_factory.mktemp("recipe_shared"), timeout=600)
    return out


def _matches_ddp(got: dict) -> None:
    assert got["parity"] <= BAR, got
    assert got["loss_gap"] <= LOSS_GAP, got
    assert got["eval_steps"] == [3, 6], got


def test_ddp_reference_ran_both_runs(world4):
    assert result(world4, "recipe_ddp")["runs"] == ["archopt muon", "adamw lr=0.003"]


def test_fsdp2_matches_ddp_and_resumes_exactly(world4):
    got = result(world4, "recipe_fsdp2")
    _matches_ddp(got)
    assert got["stopped"] and got["resume_mismatch"] == [] and got["resume_same_losses"], got
    # DCP folders with the latest pointer; keep_last 1 pruned the step-3 one after step 6
    assert got["checkpoints"] == ["latest", "step_00000006"], got


def test_hsdp_matches_ddp(world4):
    _matches_ddp(result(world4, "recipe_hsdp"))


def test_deepspeed_zero2_matches_ddp_with_the_baseline(world4):
    got = result(world4, "recipe_deepspeed_zero2")
    _matches_ddp(got)  # loss_gap covers the ArchOptAdamw baseline run too
    assert got["runs"] == ["archopt muon", "adamw lr=0.003"]


def test_deepspeed_zero3_matches_ddp_and_resumes_exactly(world4):
    got = result(world4, "recipe_deepspeed_zero3")
    _matches_ddp(got)
    assert got["stopped"] and got["resume_mismatch"] == [] and got["resume_same_losses"], got
    assert "latest" in got["checkpoints"] and "step_00000003" not in got["checkpoints"], got
