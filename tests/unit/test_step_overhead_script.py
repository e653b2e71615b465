"""benchmarks/step_overhead.py still runs (on a tiny model, one step: no timing is checked here)."""

import importlib.util
from pathlib import Path

from tiny_models import tiny_llama


def test_step_overhead_benchmark_runs_and_counts_state_bytes():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "step_overhead.py"
    spec = importlib.util.spec_from_file_location("step_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows, info = bench.run(repeats=1, steps=1, warmup=1, model_fn=lambda: tiny_llama(tied=False))
    by = {r["name"]: r for r in rows}
    assert set(by) == set(bench.configurations(tiny_llama()))
    # one fp32 momentum buffer (+ ArchOpt's 4-byte step count per tensor)
    assert 4.0 <= by["ArchOpt muon, fp32"]["matrix_bytes_per_param"] < 4.01
    assert 4.0 <= by["torch.optim.Muon (bf16) + AdamW"]["matrix_bytes_per_param"] < 4.01
    assert by["torch.optim.AdamW (foreach)"]["bytes_per_param"] > 8.0  # two moments (+ step scalars)
    assert "| ArchOpt lion |" in bench.render(rows, info, "cmd")
