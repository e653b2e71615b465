"""Megatron-core adapter: ``OptimizerConfig(optimizer="archopt_<name>")`` through ``get_megatron_optimizer``.

    from archopt_plugins.integrations import megatron as archopt_megatron
    archopt_megatron.enable()                      # once, before building the optimizer
    config = OptimizerConfig(optimizer="archopt_muon", lr=0.02, bf16=True, use_distributed_optimizer=True)
    config.archopt_hparams = {"adamw_lr": 3e-4}    # any other archopt keyword (optional)
    optimizer = get_megatron_optimizer(config, [ddp_model])

The model is a megatron-core model (``GPTModel`` …) in Megatron's ``DistributedDataParallel`` with
``use_distributed_optimizer=True``; roles come from its module structure (fused ``linear_qkv`` per
query group, vocabulary-parallel embeddings, the output layer), matrix rules see complete matrices
under tensor parallelism (the sharding engine gathers TP shards and distributed-optimizer ranges to
one owner), and checkpoints go through Megatron's ``dist_checkpointing``. See docs/megatron.md.
Host objects in, archopt calls out: no math and no communication of its own.
"""

from __future__ import annotations

from typing import Any

from .enable import SUPPORTED_MEGATRON, UnsupportedMegatronVersion, check_megatron_version, disable, enable, is_enabled

_LAZY = {  # these import megatron-core (and torch) when first used
    "build_megatron_optimizer": ".optimizer",
    "MegatronInnerOptimizer": ".optimizer",
    "ArchOptDistributedOptimizer": ".checkpoint",
    "megatron_optimizer_names": ".config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SUPPORTED_MEGATRON", "ArchOptDistributedOptimizer", "MegatronInnerOptimizer", "UnsupportedMegatronVersion",
           "build_megatron_optimizer", "check_megatron_version", "disable", "enable", "is_enabled",
           "megatron_optimizer_names"]
