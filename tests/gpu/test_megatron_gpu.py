"""The Megatron GPU check (tests/gpu/megatron_gpu_check.py) from pytest.

On a CUDA machine it runs the real check (no shim). Everywhere, the script's own logic is smoke-tested
on CPU under the test-only shim (--cpu-smoke): that proves the script runs and its comparisons hold,
nothing about CUDA.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "megatron_gpu_check.py"
pytest.importorskip("megatron.core")


def _run(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[1]))
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result line (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert proc.returncode == 0 and not result["failures"], result
    return result


@pytest.mark.slow
def test_gpu_check_script_logic_on_cpu_smoke():
    result = _run("--cpu-smoke")
    assert result["plain_archopt_relative_difference"] <= 1e-5 and result["checkpoint_round_trip"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_megatron_step_on_gpu():
    result = _run()
    assert result["plain_archopt_relative_difference"] <= 1e-5 and result["checkpoint_round_trip"]
