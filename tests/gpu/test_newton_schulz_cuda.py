"""Newton–Schulz on a CUDA device: the bf16 fast path against the fp64 reference, and the GPU
throughput benchmark's measurement path. Skipped where no CUDA device is present."""

import importlib.util
from pathlib import Path

import pytest
import torch

from archopt_plugins.update.newton_schulz import newton_schulz, newton_schulz_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_newton_schulz_on_cuda_is_close_to_the_fp64_reference():
    G = torch.randn(4, 256, 512, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    fast = newton_schulz(G, 5, "quintic", torch.bfloat16).double().cpu()
    ref = newton_schulz_reference(G.cpu(), 5, "quintic")
    assert float((fast - ref).norm() / ref.norm()) < 3e-2  # bf16 rounding over 5 iterations


def test_throughput_benchmark_measures():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "newton_schulz_throughput.py"
    spec = importlib.util.spec_from_file_location("ns_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows, mm_tflops = bench.measure(batch=2, steps=5, repeats=2, warmup=1)
    assert mm_tflops > 0 and len(rows) == 2 and all(0 < r["fraction"] < 2 for r in rows)
