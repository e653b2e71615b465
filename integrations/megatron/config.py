"""From a megatron-core ``OptimizerConfig`` to an archopt name and hyperparameters, or a clear refusal.

``OptimizerConfig(optimizer="archopt_<name>", lr=…, weight_decay=…)`` selects archopt's ``<name>``.
The config's generic fields map to archopt hyperparameters the way a Megatron user reads them:

=========================  ====================================================================
``lr``                     ``lr`` of the name's main rule (Muon's, SOAP's …, or AdamW's for ``adamw``)
``weight_decay``           ``weight_decay`` of the main rule
``adam_beta1/2``, ``adam_eps``   the AdamW that runs embeddings, norms and the output head
                           (``adamw_betas``/``adamw_eps``; ``betas``/``eps`` for the name ``adamw``)
``min_lr``                 the schedule floor, as a fraction of each group's peak (see ``optimizer.py``)
``clip_grad``              gradient clipping, done by Megatron's wrapper before archopt's step
=========================  ====================================================================

Everything else archopt knows (``momentum``, ``ns_steps``, ``adamw_lr``, ``compute_dtype``,
``sharding``, ``overrides`` …) goes in ``config.archopt_hparams``, a dict set on the config
(``OptimizerConfig`` is a plain dataclass) and passed to ``build_optimizer`` as keywords; a key
given there wins over the mapped field. Megatron's own ``muon_*`` fields configure Megatron's
Muon, not archopt's, and are not read: archopt is exact under tensor parallelism by default and
orthogonalizes each shard alone only when asked by name (``archopt_hparams={"sharding": "blockwise"}``).

Settings this adapter does not serve raise ``ValueError`` naming the field and the fix.
"""

from __future__ import annotations

from typing import Any

PREFIX = "archopt_"
HPARAMS_ATTRIBUTE = "archopt_hparams"


def is_archopt(optimizer: Any) -> bool:
    return isinstance(optimizer, str) and optimizer.startswith(PREFIX)


def archopt_name(optimizer: str) -> str:
    """``archopt_muon`` → ``muon``, checked against ``available_optimizers()``."""
    from archopt_plugins import available_optimizers

    name = optimizer[len(PREFIX):]
    if name not in available_optimizers():
        choices = ", ".join(PREFIX + n for n in available_optimizers())
        raise ValueError(f"OptimizerConfig.optimizer={optimizer!r}: archopt has no optimizer {name!r}; "
                         f"use one of: {choices}")
    return name


def megatron_optimizer_names() -> list[str]:
    """Every ``OptimizerConfig.optimizer`` value this adapter serves."""
    from archopt_plugins import available_optimizers

    return [PREFIX + n for n in available_optimizers()]


# (field, value Megatron would need, why not, fix) — checked in this order.
_REFUSED = (
    ("fp16", True, "fp16 training needs dynamic loss scaling, which this adapter does not cover",
     "train in bf16 (bf16=True) or fp32"),
    ("use_precision_aware_optimizer", True, "the precision-aware path hands the step to TE's FusedAdam",
     "set use_precision_aware_optimizer=False"),
    ("optimizer_cpu_offload", True, "CPU offload swaps the optimizer for Megatron's HybridDeviceOptimizer",
     "set optimizer_cpu_offload=False"),
    ("use_layer_wise_distributed_optimizer", True,
     "archopt shards through Megatron's distributed optimizer (flat shards of the gradient buffer) and "
     "its own sharding engine, not the layer-wise optimizer",
     "set use_layer_wise_distributed_optimizer=False and use_distributed_optimizer=True"),
    ("overlap_param_gather_with_optimizer_step", True, "the optimizer step is one collective program",
     "set overlap_param_gather_with_optimizer_step=False"),
)


def check_config(config: Any) -> None:
    """Refuse settings the adapter does not serve, naming the field."""
    for field, bad, why, fix in _REFUSED:
        if getattr(config, field, None) == bad:
            raise ValueError(f"OptimizerConfig.{field}={bad!r} is not supported with "
                             f"optimizer={config.optimizer!r}: {why}; {fix}")
    if not getattr(config, "use_distributed_optimizer", False):
        raise ValueError(
            f"OptimizerConfig.use_distributed_optimizer=False with optimizer={config.optimizer!r}: archopt under "
            "Megatron runs inside Megatron's distributed optimizer (fp32 main parameters sharded over the data-"
            "parallel ranks, the sharding engine assembling whole matrices). Set use_distributed_optimizer=True "
            "in OptimizerConfig and in DistributedDataParallelConfig (it works with one data-parallel rank too)")
    if config.lr is None:
        raise ValueError(f"OptimizerConfig.lr is None with optimizer={config.optimizer!r}: set the peak "
                         "learning rate of the main rule (e.g. lr=0.02 for archopt_muon)")


def hparams_from_config(config: Any, name: str) -> dict[str, Any]:
    """archopt keywords for ``name`` from the config's mapped fields and ``config.archopt_hparams``."""
    from archopt_plugins.planner import get_name

    opt = get_name(name)
    mapped: dict[str, Any] = {"lr": float(config.lr), "weight_decay": float(config.weight_decay)}
    betas = (float(config.adam_beta1), float(config.adam_beta2))
    if name == "adamw":
        mapped.update(betas=betas, eps=float(config.adam_eps))
    elif opt.route("adamw_betas") is not None:
        mapped.update(adamw_betas=betas, adamw_eps=float(config.adam_eps))
    mapped = {k: v for k, v in mapped.items() if opt.route(k) is not None}
    extra = getattr(config, HPARAMS_ATTRIBUTE, None) or {}
    if not isinstance(extra, dict):
        raise TypeError(f"OptimizerConfig.{HPARAMS_ATTRIBUTE} must be a dict of archopt keywords, got "
                        f"{type(extra).__name__}")
    return {**mapped, **extra}
