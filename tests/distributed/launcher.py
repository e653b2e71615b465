"""Launch the harness once per world size and hand each pytest test its case's result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent / "harness.py"


def launch(world: int, cases: list[str], out: Path, shared: Path, timeout: int = 900) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ARCHOPT_SHARED_DIR=str(shared))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(HARNESS), str(out), *cases]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    (out / "launch.log").write_text(proc.stdout + "\n" + proc.stderr)


def result(out: Path, name: str) -> dict:
    """The case's rank-0 result; fails the test with the traceback when the case raised on any rank."""
    errors = sorted(out.glob(f"{name}.rank*.json"))
    path = out / f"{name}.json"
    if not path.exists():
        log = (out / "launch.log").read_text() if (out / "launch.log").exists() else ""
        pytest.fail(f"case {name} produced no result; launch log tail:\n{log[-4000:]}")
    data = json.loads(path.read_text())
    for e in errors:
        other = json.loads(e.read_text())
        pytest.fail(f"case {name} failed on {e.stem}:\n{other['error']}")
    if not data["ok"]:
        pytest.fail(f"case {name} failed:\n{data['error']}")
    return data["result"]
