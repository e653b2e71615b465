"""Checkpoint cases: save under FSDP2 at world 2; resume there bit-exactly; load at world 4 (FSDP2, DDP).

The world-2 launch writes, per optimizer name, the checkpoint after 3 steps and the parameters of an
uninterrupted 6-step run into the shared folder; the world-4 launch and a single process (pytest)
load the checkpoint and continue for steps 4-6.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from archopt_plugins import build_optimizer
from archopt_plugins.optim.checkpoint import load_checkpoint, save_checkpoint
from cases_parity import _fsdp, _llama
from harness import case, shared_dir
from parity_util import batches, full_params, guarded, hparams, local_part, names, parity, train


def _continue(model, opt, first: int, last: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    train(model, opt, [local_part(b, rank, world) for b in batches()[first:last]])


def _fsdp_model(seed: int = 0):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return _fsdp(mesh)(_llama() if seed == 0 else _reseeded(seed))


def _reseeded(seed: int):
    from tiny_models import tiny_llama

    return tiny_llama(tied=True, layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seed=seed)


@case
def ckpt_save_fsdp2():
    root = shared_dir() / "ckpt"
    results = {}
    for name in names():
        def one():
            hp = hparams(name)
            straight = _fsdp_model()
            opt = build_optimizer(straight, name, **hp)
            _continue(straight, opt, 0, 6)
            final = full_params(straight)
            if dist.get_rank() == 0:
                (root / name).mkdir(parents=True, exist_ok=True)
                torch.save(final, root / f"{name}.final.pt")
            first = _fsdp_model()
            opt1 = build_optimizer(first, name, **hp)
            _continue(first, opt1, 0, 3)
            save_checkpoint(root / name, first, opt1, step=3)
            resumed = _fsdp_model(seed=7)  # other initial weights: the load must overwrite them
            opt2 = build_optimizer(resumed, name, **hp)
            step, _ = load_checkpoint(root / name, resumed, opt2)
            _continue(resumed, opt2, step, 6)
            got = full_params(resumed)
            if dist.get_rank() == 0:
                worst, where = parity(final, got)
                return {"parity": worst, "worst": where}

        results[name] = guarded(one)
    return results


def _load_elsewhere(wrap) -> dict:
    root = shared_dir() / "ckpt"
    results = {}
    for name in names():
        def one():
            model = wrap(_reseeded(11))
            inner = model.module if hasattr(model, "module") else model
            opt = build_optimizer(inner, name, **hparams(name))
            step, _ = load_checkpoint(root / name, model, opt)
            _continue(model, opt, step, 6)
            got = full_params(model)
            if dist.get_rank() == 0:
                worst, where = parity(torch.load(root / f"{name}.final.pt"), got)
                return {"parity": worst, "worst": where, "step": step}

        results[name] = guarded(one)
    return results


@case
def ckpt_load_fsdp4():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return _load_elsewhere(_fsdp(mesh))


@case
def ckpt_load_ddp4():
    return _load_elsewhere(lambda m: DistributedDataParallel(m))
