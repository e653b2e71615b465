"""archopt in a plain Accelerate training loop (no Trainer).

    accelerator = Accelerator()
    optimizer = build_optimizer(accelerator, model, "muon", lr=0.02, adamw_lr=3e-3)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

``build_optimizer`` plans on the unwrapped model (real FQNs and module structure, also when the
model was prepared already), prints the plan once on the main process, and refuses the
Accelerate setups where the optimizer would be ignored or run the wrong math:

* DeepSpeed with an ``"optimizer"`` block in its config: DeepSpeed would build that one and drop
  archopt's silently; remove the block (or don't pass archopt's optimizer);
* DeepSpeed without one: ZeRO's flat partitions need the DeepSpeed adapter, not available in
  this version yet;
* FSDP1: flat parameters without matrix structure.

DDP (``accelerate launch --multi_gpu``, also on CPU) needs nothing: gradients arrive averaged and
every rank applies the same update. FSDP2 swaps the parameters for ``Shard(0)`` DTensors after
``prepare``; the optimizer's state is created at the first step, when the sharding engine also
discovers the layout and gathers each matrix to its owner (exact updates). ``save_state`` /
``load_state`` checkpoint the optimizer through its ``state_dict`` like any other.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from archopt_plugins import ArchOpt


def _distributed_type(accelerator: Any) -> str:
    kind = getattr(accelerator, "distributed_type", None)
    if kind is None:
        kind = getattr(getattr(accelerator, "state", None), "distributed_type", "NO")
    return str(getattr(kind, "value", kind))


def check_accelerator(accelerator: Any, name: str) -> None:
    """Raise for Accelerate setups in which archopt's optimizer would be ignored or inexact."""
    kind = _distributed_type(accelerator)
    if kind == "DEEPSPEED":
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        config = getattr(plugin, "deepspeed_config", None) or {}
        if "optimizer" in config:
            raise ValueError(
                f"archopt optimizer {name!r} conflicts with the DeepSpeed config's \"optimizer\" block (type "
                f"{config['optimizer'].get('type', '?')!r}): DeepSpeed would build its own and silently drop "
                "archopt's. Remove the \"optimizer\" block from the DeepSpeed config, or use DeepSpeed's optimizer")
        raise ValueError(
            f"archopt optimizer {name!r} under Accelerate's DeepSpeed plugin is not supported yet: ZeRO steps the "
            "optimizer on flat partitions that the DeepSpeed adapter (not available in this version) must map "
            "back to matrices. Use DDP (accelerate launch --multi_gpu) or DeepSpeed's own optimizer")
    if kind == "FSDP":
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        if int(getattr(plugin, "fsdp_version", 2) or 2) == 1:
            raise ValueError(
                f"archopt optimizer {name!r} under FSDP1 is not supported: FSDP1 hands the optimizer flat "
                "parameters whose matrix structure is lost. Use FSDP2 (fsdp_version: 2)")


def build_optimizer(accelerator: Any, model: nn.Module, name: str = "muon", log_plan: bool = True,
                    **hparams: Any) -> ArchOpt:
    """An ``ArchOpt`` for ``model`` under ``accelerator``; pass both to ``accelerator.prepare`` next."""
    check_accelerator(accelerator, name)
    module = accelerator.unwrap_model(model) if hasattr(accelerator, "unwrap_model") else model
    optimizer = ArchOpt(module, name, **hparams)
    if log_plan and getattr(accelerator, "is_main_process", True):
        print(optimizer.plan.summary(), flush=True)
    return optimizer
