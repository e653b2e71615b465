"""Two torchrun launches for the whole distributed suite: world 2 first, then world 4.

Every case of every test module here runs in one of them (each launch costs 7-10 s on 2 cores).
The world-4 launch comes after the world-2 one because it loads checkpoints that one saved.
"""

from __future__ import annotations

import pytest

from launcher import launch

WORLD2 = ["ddp_llama", "fsdp_llama", "fsdp_llama_optimizer_first", "ddp_moe", "ckpt_save_fsdp2"]
WORLD4 = ["fsdp_llama", "hsdp_llama", "fsdp_tp_llama", "fsdp_moe", "flat_fragments", "tp_blocks_from_hints",
          "injected_fsdp_tp", "blockwise_gap", "bad_inputs", "nonfinite_one_rank", "scion_sign_on_pieces", "moe_expert_owners", "ckpt_load_fsdp4", "ckpt_load_ddp4"]
# Megatron CPU smoke tests (cases_megatron.py): last in each launch, they patch megatron-core's CUDA calls
# for their own duration only.
WORLD2 += ["megatron_tp2"]
WORLD4 += ["megatron_tp2_dp2", "megatron_recipe"]


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="session")
def world2(tmp_path_factory, shared):
    out = tmp_path_factory.mktemp("world2")
    launch(2, WORLD2, out, shared)
    return out


@pytest.fixture(scope="session")
def world4(tmp_path_factory, shared, world2):
    out = tmp_path_factory.mktemp("world4")
    launch(4, WORLD4, out, shared)
    return out
