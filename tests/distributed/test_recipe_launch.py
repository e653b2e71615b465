"""`archopt run` under torchrun: two "nodes" on loopback, and an elastic restart after a killed rank.

Two launches (7-10 s each before any training on this machine), shared by the tests through
module fixtures:

- ``two_nodes``: launch.nodes = 2 × 1 process, c10d rendezvous on 127.0.0.1, both agents started
  here as `archopt run RECIPE --node-rank K` — an uninterrupted 2-rank DDP run;
- ``killed_rank``: one node × 2 processes with launch.max_restarts = 1; rank 1 SIGKILLs itself at
  step 4 (``ARCHOPT_FAULT_INJECT``); torchrun restarts the group, which resumes from the step-3
  checkpoint.

Because batches depend only on (seed, step) and a sum of two floats does not depend on its order,
the restarted run must end with parameters *bitwise equal* to the uninterrupted one; and both must
match a single-process run of the same global batch to reduction-order tolerance.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from archopt_plugins.cli import main
from archopt_plugins.recipe.history import RunHistory
from recipe_fixtures import ROOT, tiny, write_recipe

pytestmark = pytest.mark.slow

DDP = {"backend.kind": "ddp", "batch.micro_batch_size": 2, "batch.global_batch_size": 4, "baseline.enabled": False,
       "logging.tensorboard": False, "checkpoint.every_steps": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final(out):
    ckpt = out / "archopt_muon" / "checkpoints" / "step_00000006.pt"
    return torch.load(ckpt, weights_only=True)["engine"]["model"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _communicate(proc: subprocess.Popen, timeout: float) -> str:
    """Output of ``proc``; past ``timeout`` its whole session (torchrun and workers) is killed."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0] + f"\n[test] killed after {timeout} s"


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Both launches at once (their start-up is mostly waiting): {name: (out dir, exit codes, logs)}."""
    tmp = tmp_path_factory.mktemp("launches")
    two = write_recipe(tmp / "two_nodes.yaml", tiny(**DDP, **{
        "launch.nodes": 2, "launch.rdzv_endpoint": f"127.0.0.1:{_free_port()}"}))
    killed = write_recipe(tmp / "killed.yaml", tiny(**DDP, **{"launch.nproc_per_node": 2, "launch.max_restarts": 1}))
    cli = [sys.executable, "-m", "archopt_plugins.cli", "run"]
    spawn = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp, start_new_session=True)
    procs = {
        "killed_rank": [subprocess.Popen(cli + [str(killed), "--out", str(tmp / "killed")],
                                         env={**_env(), "ARCHOPT_FAULT_INJECT": "1:4"}, **spawn)],
        "two_nodes": [subprocess.Popen(cli + [str(two), "--out", str(tmp / "two"), "--node-rank", str(k)], env=_env(),
                                       **spawn) for k in (0, 1)],
    }
    logs = {name: [_communicate(p, 360) for p in ps] for name, ps in procs.items()}
    return {"killed_rank": (tmp / "killed", [p.returncode for p in procs["killed_rank"]], logs["killed_rank"]),
            "two_nodes": (tmp / "two", [p.returncode for p in procs["two_nodes"]], logs["two_nodes"])}


@pytest.fixture(scope="module")
def two_nodes(launches):
    return launches["two_nodes"]


@pytest.fixture(scope="module")
def killed_rank(launches):
    out, codes, logs = launches["killed_rank"]
    return out, codes[0], logs[0]


def test_two_nodes_on_loopback_run_the_recipe_end_to_end(two_nodes):
    out, codes, logs = two_nodes
    assert codes == [0, 0], logs
    history = RunHistory.load(out / "archopt_muon" / "result.json")
    assert history.finished and history.eval_steps == [3, 6]
    assert "2 process(es), backend ddp" in "".join(logs) and (out / "report.md").exists()


def test_killed_rank_restarts_and_resumes_to_the_uninterrupted_parameters(two_nodes, killed_rank):
    out, code, log = killed_rank
    assert code == 0, log
    assert "killing this process at step 4" in log and "resumed from" in log and "step_00000003.pt at step 3" in log
    reference, restarted = _final(two_nodes[0]), _final(out)
    assert reference.keys() == restarted.keys()
    for key in reference:
        assert torch.equal(reference[key], restarted[key]), key
    a = RunHistory.load(two_nodes[0] / "archopt_muon" / "result.json")
    b = RunHistory.load(out / "archopt_muon" / "result.json")
    assert a.train_loss == b.train_loss and a.steps == b.steps == [1, 2, 3, 4, 5, 6]


def test_ddp_matches_a_single_process_run_of_the_same_global_batch(two_nodes, tmp_path):
    recipe = write_recipe(tmp_path / "single.yaml", tiny(**{**DDP, "backend.kind": "single",
                                                            "batch.micro_batch_size": 4}))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
    single, ddp = _final(tmp_path / "out"), _final(two_nodes[0])
    for key in single:
        rel = (single[key] - ddp[key]).norm() / single[key].norm().clamp_min(1e-30)
        assert rel <= 5e-5, (key, float(rel))
