"""Parity cases: every optimizer name × {DDP, FSDP2, HSDP, FSDP2×TP} on a tiny Llama and a tiny MoE."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from harness import case
from parity_util import run_parity
from tiny_models import tiny_llama, tiny_mixtral


def _fsdp(mesh):
    def wrap(model):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    return wrap


def _llama():
    return tiny_llama(tied=True, layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seed=0)


def _moe():
    return tiny_mixtral(layers=1, hidden=32, experts=4, vocab=64, seed=0)


@case
def ddp_llama():
    return run_parity(_llama, lambda m: DistributedDataParallel(m), dist.get_rank(), dist.get_world_size())


@case
def fsdp_llama():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return run_parity(_llama, _fsdp(mesh), dist.get_rank(), dist.get_world_size())


@case
def fsdp_llama_optimizer_first():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return run_parity(_llama, _fsdp(mesh), dist.get_rank(), dist.get_world_size(), swap_after_wrap=True)


@case
def hsdp_llama():
    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    return run_parity(_llama, _fsdp(mesh), dist.get_rank(), dist.get_world_size())


TP_PLAN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def tp_wrap(mesh):
    """Column-wise q/k/v/gate/up and row-wise o/down on mesh["tp"], then FSDP2 on mesh["dp"]."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {name: RowwiseParallel() if name.endswith(("o_proj", "down_proj")) else ColwiseParallel()
            for name in TP_PLAN}

    def wrap(model):
        for layer in model.model.layers:
            parallelize_module(layer, mesh["tp"], plan)
        return _fsdp(mesh["dp"])(model)

    return wrap


@case
def fsdp_tp_llama():
    mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))
    return run_parity(_llama, tp_wrap(mesh), mesh.get_local_rank("dp"), mesh["dp"].size())


@case
def ddp_moe():
    return run_parity(_moe, lambda m: DistributedDataParallel(m), dist.get_rank(), dist.get_world_size())


@case
def fsdp_moe():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return run_parity(_moe, _fsdp(mesh), dist.get_rank(), dist.get_world_size())
