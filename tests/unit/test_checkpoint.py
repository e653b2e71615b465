"""Checkpoints through archopt_plugins.optim.checkpoint in one process: exact resume, loud mismatches, atomicity."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from archopt_plugins import available_optimizers, build_optimizer
from archopt_plugins.optim.checkpoint import load_checkpoint, resolve, save_checkpoint
from tiny_models import causal_lm_loss, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _train(model, opt, first, last):
    for i in range(first, last):
        causal_lm_loss(model, seed=i).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", available_optimizers())
def test_resume_is_bit_exact(tmp_path, name):
    straight = tiny_llama(seed=1)
    opt = build_optimizer(straight, name)
    _train(straight, opt, 0, 4)

    first = tiny_llama(seed=1)
    opt1 = build_optimizer(first, name)
    _train(first, opt1, 0, 2)
    save_checkpoint(tmp_path, first, opt1, step=2, extra={"data_position": 17})

    resumed = tiny_llama(seed=2)
    opt2 = build_optimizer(resumed, name)
    step, extra = load_checkpoint(tmp_path, resumed, opt2)
    assert (step, extra) == (2, {"data_position": 17})
    _train(resumed, opt2, step, 4)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_mismatched_checkpoints_name_the_parameter(tmp_path):
    model = tiny_llama()
    opt = build_optimizer(model, "muon")
    _train(model, opt, 0, 1)
    save_checkpoint(tmp_path, model, opt, step=1)

    other_rule = build_optimizer(model, "muon", overrides={"attn_q": {"rule": "adamw"}})
    with pytest.raises(ValueError, match=r"parameter 'model.layers.0.self_attn.q_proj.weight': checkpoint was saved "
                                         r"with rule 'muon', this optimizer runs 'adamw'"):
        load_checkpoint(tmp_path, model, other_rule)
    untied = tiny_llama(tied=False)
    with pytest.raises(ValueError, match=r"checkpoint has no parameter 'lm_head.weight'"):
        load_checkpoint(tmp_path, untied, build_optimizer(untied, "muon"))
    wider = tiny_llama(hidden=48)
    with pytest.raises(ValueError, match=r"parameter 'model.embed_tokens.weight': checkpoint shape \(64, 32\), "
                                         r"this model \(64, 48\)"):
        load_checkpoint(tmp_path, wider, build_optimizer(wider, "muon"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "empty", model, opt)



def test_soap_checkpoint_of_the_unrotated_first_moment_is_refused_naming_the_key(tmp_path):
    """SOAP's m once lived in the original coordinates under "exp_avg"; now it is "exp_avg_rotated".

    Such a checkpoint must not load (its m would be read in the wrong coordinates), and both load
    paths say which key and why rather than blaming the model or the hyperparameters.
    """
    import copy

    model = tiny_llama()
    opt = build_optimizer(model, "soap")
    _train(model, opt, 0, 2)
    for state in opt.state.values():  # what the earlier layout saved
        if "exp_avg_rotated" in state:
            state["exp_avg"] = state.pop("exp_avg_rotated")
    why = (r"parameter 'model.layers.0.self_attn.q_proj.weight': checkpoint state 'exp_avg' is from an earlier "
           r"state layout of rule 'soap' and cannot be resumed: SOAP now keeps its first moment in each block's "
           r"eigenbasis as 'exp_avg_rotated'")
    with pytest.raises(ValueError, match=why):
        build_optimizer(tiny_llama(), "soap").load_state_dict(copy.deepcopy(opt.state_dict()))
    save_checkpoint(tmp_path, model, opt, step=2)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match=why):
        load_checkpoint(tmp_path, fresh, build_optimizer(fresh, "soap"))

KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch.distributed.checkpoint as dcp
    from archopt_plugins import build_optimizer
    from archopt_plugins.optim import checkpoint
    from tiny_models import causal_lm_loss, tiny_llama

    model = tiny_llama()
    opt = build_optimizer(model, "muon")
    causal_lm_loss(model).backward()
    opt.step()
    checkpoint.save_checkpoint({root!r}, model, opt, step=1)
    opt.step()
    original = dcp.save

    def save_then_die(*args, **kwargs):  # killed after the tensors are written, before the rename
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_save = dcp.save = save_then_die
    checkpoint.save_checkpoint({root!r}, model, opt, step=2)
""")


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    script = KILLER.format(tests=str(Path(__file__).resolve().parents[1]), root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert resolve(root).name == "step_00000001"
    assert any(p.name.startswith(".tmp-step_00000002") for p in root.iterdir())  # the half-written save
    model = tiny_llama(seed=3)
    opt = build_optimizer(model, "muon")
    assert load_checkpoint(root, model, opt)[0] == 1
    save_checkpoint(root, model, opt, step=3)  # the next save clears the leftovers
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert resolve(root).name == "step_00000003"
