"""Sharded checkpoints: exact resume at the same world size; FSDP2 world 2 -> world 4 -> one process, and DDP."""

from __future__ import annotations

import sys

import pytest
import torch

from launcher import result
from test_engine import END_TO_END_BARS, check_parity

pytestmark = pytest.mark.slow


def test_resume_at_same_world_size_is_bit_exact(world2):
    check_parity(result(world2, "ckpt_save_fsdp2"), default=0.0)


@pytest.mark.parametrize("case", ["ckpt_load_fsdp4", "ckpt_load_ddp4"])
def test_load_at_another_world_size_and_layout(world4, case):
    res = result(world4, case)
    check_parity(res, END_TO_END_BARS)
    assert all(r.get("step") == 3 for r in res.values() if "error" not in r)


def test_load_in_one_process(world2, shared):
    sys.path.insert(0, str(shared.parent))
    from archopt_plugins import available_optimizers, build_optimizer
    from archopt_plugins.optim.checkpoint import load_checkpoint
    from parity_util import batches, hparams, parity
    from tiny_models import tiny_llama

    failures = []
    for name in available_optimizers():
        model = tiny_llama(tied=True, layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seed=5)
        opt = build_optimizer(model, name, **hparams(name))
        step, _ = load_checkpoint(shared / "ckpt" / name, model, opt)
        for ids in batches()[step:6]:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        final = torch.load(shared / "ckpt" / f"{name}.final.pt")
        worst, where = parity(final, {n: p.detach() for n, p in model.named_parameters()})
        if worst > END_TO_END_BARS.get(name, 5e-5):
            failures.append(f"{name}: {worst:.2e} at {where}")
    assert not failures, failures
