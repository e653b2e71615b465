"""Megatron CPU smoke tests: archopt through megatron-core's get_megatron_optimizer on a real GPTModel.

CPU smoke tests, not GPU evidence: megatron-core runs on gloo under a test-only shim that redirects
its hard CUDA calls (tests/megatron_cpu_shim.py); tests/gpu/megatron_gpu_check.py is the GPU check.
The cases run in the shared world-2 and world-4 launches (cases_megatron.py). Bars as for the other
stacks (test_engine.py): 5e-5 end to end for Muon, the looser end-to-end bar for SOAP's eigenbasis,
and bitwise-identical parameters when the reference's gradients are injected.
"""

from __future__ import annotations

import pytest

from launcher import result
from test_engine import END_TO_END_BARS, PARITY_BAR

pytestmark = pytest.mark.slow
BARS = {"muon": PARITY_BAR, "soap": END_TO_END_BARS["soap"]}


def _check(parity: dict) -> None:
    assert sorted(parity) == ["muon", "soap"]
    failures = []
    for name, r in parity.items():
        if "error" in r:
            failures.append(f"{name}: raised\n{r['error']}")
        elif not r["parity"] <= BARS[name]:
            failures.append(f"{name}: parity {r['parity']:.2e} > {BARS[name]:.0e} at {r['worst']}")
        elif "injected_parity" in r and r["injected_parity"] != 0.0:
            failures.append(f"{name}: injected gradients gave parity {r['injected_parity']:.2e} at "
                            f"{r['injected_worst']} (expected bitwise-identical parameters)")
    assert not failures, "\n".join(failures)


def test_megatron_tp2_parity_smoke(world2):
    res = result(world2, "megatron_tp2")
    _check(res["parity"])
    assert res["parity"]["muon"]["bytes_received"] > 0  # TP shards did travel to their owners


def test_megatron_tp2_dp2_parity_smoke(world4):
    res = result(world4, "megatron_tp2_dp2")
    _check(res["parity"])
    # the distributed optimizer cut a row-split weight mid-row (FlatRange) and a TP column block
    # mid-block (BlockRange, with bitwise results under injected gradients)
    muon = res["parity"]["muon"]
    assert "FlatRange" in muon["piece_kinds"] and "BlockRange" in muon["injected_piece_kinds"], muon


def test_megatron_checkpoint_resumes_exactly_smoke(world2):
    res = result(world2, "megatron_tp2")["resume"]
    for name, r in res.items():
        assert "error" not in r, r.get("error")
        assert r["resume_difference"] == 0.0, (name, r)


def test_megatron_checkpoint_loads_at_another_dp_size_smoke(world4):
    res = result(world4, "megatron_tp2_dp2")["reload_dp2"]
    assert sorted(res) == ["muon", "soap"]
    for name, r in res.items():
        assert "error" not in r, r.get("error")
        assert r["parity"] <= BARS[name], (name, r)


def test_megatron_recipe_trains_checkpoints_and_resumes_smoke(world4):
    """recipes/gpu/megatron_llama_tp2_8gpu.yaml shrunk to CPU: TP 2 × DP 2, micro-batches, schedule,
    dist checkpoints."""
    res = result(world4, "megatron_recipe")
    assert res["runs"] == ["adamw lr=0.001", "archopt muon"] and res["report_mentions_runs"]
    assert res["checkpoints"] == ["step_00000003", "step_00000006"]
    assert len(res["train_loss"]) == 6 and res["metrics_lines"] == 6
    assert res["val_loss"][-1] < res["val_loss"][0] < 5.6  # it learns (byte vocabulary: ln 256 = 5.55 at start)
    # resumed from step 3: the record up to there is the checkpoint's, steps 4-6 retrained identically
    assert res["resumed_train_seconds"][0] == res["train_seconds"][0]
    assert res["resumed_train_loss"] == res["train_loss"] and res["resumed_val_loss"] == res["val_loss"]
