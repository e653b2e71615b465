"""The archopt optimizer megatron-core's ``get_megatron_optimizer`` returns for ``optimizer="archopt_<name>"``.

Built from Megatron's own parts so a Megatron training loop drives it like its Adam:

* ``ArchOptDistributedOptimizer`` is Megatron's ``DistributedOptimizer`` (fp32 main parameters
  sharded over the data-parallel ranks as flat ranges of the gradient buffer, gradient clipping,
  the parameter all-gather after the step) with archopt as its inner optimizer, and archopt's
  checkpoint format (``checkpoint.py``);
* its inner optimizer, :class:`MegatronInnerOptimizer`, has one param group per archopt group
  (rule + hyperparameters) carrying the keys Megatron's ``OptimizerParamScheduler`` drives
  (``max_lr``, ``min_lr``, ``start_wd``/``end_wd``, ``wd_mult``); its step hands every planned
  parameter's piece — this rank's main-parameter shard and its gradient, or nothing — to
  ``ArchOpt.step_pieces``, whose sharding engine assembles each whole matrix on one owner rank,
  runs the rule there and scatters the update back. The pieces' places in the complete tensors
  come from the TP layout and the distributed optimizer's ranges (``layout.py``).

The plan is made once, on the TP-local module (roles from module structure), then rewritten in
complete-tensor terms. Weight decay is archopt's per rule (``OptimizerConfig.weight_decay`` for
the main rule; norms and biases none) and not scheduled; learning rates follow Megatron's
scheduler, each group from its own peak (``max_lr``) down to ``min_lr / lr`` of it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from archopt_plugins.optim.archopt import ArchOpt
from archopt_plugins.planner import make_plan

from .config import archopt_name, check_config, hparams_from_config
from .layout import check_tp_attributes, global_plan, piece_of, unwrap

# Keys of our groups that are archopt's, not Megatron's (copied into the ArchOpt before each step).
_SYNCED = ("lr", "weight_decay")


class MegatronInnerOptimizer(torch.optim.Optimizer):
    """What Megatron's DistributedOptimizer steps: Megatron-facing groups, an ArchOpt behind them."""

    def __init__(self, archopt: ArchOpt, min_lr_fraction: float) -> None:
        self.archopt = archopt
        groups = []
        for g in archopt.param_groups:
            wd = float(g.get("weight_decay", 0.0))
            groups.append({"params": list(g["params"]), "archopt_rule": g["rule"], "lr": float(g["lr"]),
                           "max_lr": float(g["lr"]), "min_lr": float(g["lr"]) * min_lr_fraction,
                           "weight_decay": wd, "start_wd": wd, "end_wd": wd, "wd_mult": 1.0, "lr_mult": 1.0,
                           "is_expert_parallel": False, "is_decoupled_lr": False, "default_config": True})
        super().__init__(groups, defaults={})
        self._names = [list(g["param_names"]) for g in archopt.param_groups]
        self._bound: list[tuple[int, str, torch.Tensor | None]] | None = None

    def bind(self, distopt: Any, tp_rank: int, tp_size: int) -> None:
        """After the DistributedOptimizer replaced our params by main-parameter shards: map them back.

        Registers every planned parameter's piece with the engine (empty where this rank holds none).
        """
        model_params = {name: p for g in self.archopt.param_groups for name, p in zip(g["param_names"], g["params"])}
        bound, hints = [], {}
        for group_index, names in enumerate(self._names):
            for name in names:
                model_param = model_params[name]
                where = distopt.model_param_group_index_map.get(model_param)
                if where is None:  # no part of this parameter in this rank's range of the buffer
                    bound.append((group_index, name, None))
                    hints[name] = piece_of(model_param, tp_rank, tp_size, (0, 0))
                    continue
                if where[0] != group_index:
                    raise RuntimeError(f"parameter {name!r}: Megatron placed it in param group {where[0]}, "
                                       f"archopt planned group {group_index}")
                shard = self.param_groups[where[0]]["params"][where[1]]
                span = distopt._get_model_param_range_map(model_param)["param"]
                if shard.numel() != span.size:
                    raise RuntimeError(f"parameter {name!r}: main-parameter shard of {shard.numel()} elements for "
                                       f"a range of {span.size}")
                bound.append((group_index, name, shard))
                hints[name] = piece_of(model_param, tp_rank, tp_size, (span.start, span.end))
        self.archopt.register_layout_hints(hints)
        self._bound = bound

    @property
    def bound(self) -> list[tuple[int, str, torch.Tensor | None]]:
        if self._bound is None:
            raise RuntimeError("the Megatron inner optimizer was stepped before bind(): build it through "
                               "get_megatron_optimizer (archopt_plugins.integrations.megatron.enable())")
        return self._bound

    def _sync_hyperparameters(self) -> None:
        for ours, theirs in zip(self.param_groups, self.archopt.param_groups):
            for key in _SYNCED:
                if key in theirs and key in ours:
                    theirs[key] = ours[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        self.archopt.step_pieces(self._pieces(zero_grads=False))
        return loss

    def _pieces(self, zero_grads: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pieces = {}
        device = next((s.device for _, _, s in self.bound if s is not None), torch.device("cpu"))
        empty = torch.empty(0, dtype=torch.float32, device=device)
        for _, name, shard in self.bound:
            if shard is None:
                pieces[name] = (empty, empty)
            else:
                grad = shard.grad if (shard.grad is not None and not zero_grads) else torch.zeros_like(shard)
                pieces[name] = (shard, grad)
        return pieces

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every state tensor (owner state on its owner) with a step at lr 0 on zero gradients.

        Used before loading a checkpoint into a fresh optimizer: the engine assigns owners and each
        rule creates its state, and lr 0 with zero gradients leaves the parameters unchanged. The
        loaded checkpoint then overwrites every state value, step counts included.
        """
        saved = [g["lr"] for g in self.archopt.param_groups]
        for g in self.archopt.param_groups:
            g["lr"] = 0.0
        try:
            self.archopt.step_pieces(self._pieces(zero_grads=True))
        finally:
            for g, lr in zip(self.archopt.param_groups, saved):
                g["lr"] = lr


def _init_state_fn(inner: MegatronInnerOptimizer, config: Any = None) -> None:
    """Megatron's hook to create optimizer state before a checkpoint is read into it."""
    params = [p for g in inner.archopt.param_groups for p in g["params"]]
    if not all(inner.archopt.state.get(p) for p in params):
        inner.init_state()


def _check_model(model_chunks: list[Any]) -> None:
    from megatron.core import parallel_state

    if len(model_chunks) != 1:
        raise ValueError(f"{len(model_chunks)} model chunks (virtual pipeline parallelism): the archopt Megatron "
                         "adapter supports one chunk per rank; set virtual_pipeline_model_parallel_size=None")
    for what, size in (("pipeline_model_parallel_size", parallel_state.get_pipeline_model_parallel_world_size()),
                       ("context_parallel_size", parallel_state.get_context_parallel_world_size())):
        if size != 1:
            raise ValueError(f"{what}={size}: the archopt Megatron adapter covers tensor × data parallelism; "
                             f"initialize_model_parallel with {what}=1")
    chunk = model_chunks[0]
    ddp_config = getattr(chunk, "ddp_config", None)
    if ddp_config is None or not ddp_config.use_distributed_optimizer:
        raise ValueError("the model chunk is not wrapped in Megatron's DistributedDataParallel with "
                         "DistributedDataParallelConfig(use_distributed_optimizer=True): archopt steps the "
                         "distributed optimizer's flat shards of its gradient buffer")
    if getattr(ddp_config, "use_megatron_fsdp", False) or ddp_config.num_distributed_optimizer_instances != 1:
        raise ValueError("Megatron-FSDP and num_distributed_optimizer_instances > 1 are not supported by the "
                         "archopt Megatron adapter")
    for name, param in chunk.named_parameters():
        if param.requires_grad and not getattr(param, "allreduce", True):
            raise ValueError(f"parameter {name!r} is expert-parallel (MoE experts): the archopt Megatron adapter "
                             "does not cover expert parallelism yet")


def _check_overrides(config: Any, config_overrides: Any) -> None:
    """Megatron's per-parameter overrides cannot reach archopt's plan: refuse any beyond the standard ones."""
    from megatron.core.optimizer import get_standard_config_overrides

    if config_overrides is None or config_overrides == get_standard_config_overrides(config):
        return
    raise ValueError("config_overrides other than Megatron's standard ones were passed with optimizer="
                     f"{config.optimizer!r}: archopt plans per role; give per-parameter settings as archopt "
                     "overrides, e.g. config.archopt_hparams = {'overrides': {'embedding': {'lr': 1e-3}, "
                     "'*.linear_qkv.weight': {'lr': 0.01}}}")


def build_megatron_optimizer(config: Any, model_chunks: list[Any], config_overrides: Any = None,
                             pg_collection: Any = None) -> Any:
    """What ``get_megatron_optimizer`` returns for an ``archopt_*`` name: a ChainedOptimizer of one
    ``ArchOptDistributedOptimizer`` (see ``enable.py`` for how the call gets here)."""
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler
    from megatron.core.optimizer.optimizer import ChainedOptimizer
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_pg_rank, get_pg_size

    from .checkpoint import ArchOptDistributedOptimizer

    check_config(config)
    name = archopt_name(config.optimizer)
    hparams = hparams_from_config(config, name)
    _check_model(model_chunks)
    _check_overrides(config, config_overrides)
    if pg_collection is None or not hasattr(pg_collection, "tp"):
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    tp_rank, tp_size = get_pg_rank(pg_collection.tp), get_pg_size(pg_collection.tp)

    module = unwrap(model_chunks[0])
    local_plan, tensors = make_plan(module, name, **hparams)
    for fqn, tensor in tensors.items():
        check_tp_attributes(fqn, tensor, tp_size)
    archopt = ArchOpt.from_plan(global_plan(local_plan, tensors, tp_size), tensors)
    fraction = float(config.min_lr) / float(config.lr) if config.min_lr and config.lr else 0.0
    inner = MegatronInnerOptimizer(archopt, fraction)

    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(pg_collection, model_chunks,
                                                                       use_gloo_process_groups=False)
    grad_scaler = ConstantGradScaler(config.loss_scale) if config.loss_scale else None
    optimizer = ArchOptDistributedOptimizer(
        inner, config, grad_scaler, _init_state_fn, model_chunks=model_chunks,
        per_model_buffers={0: model_chunks[0].buffers}, data_parallel_group=groups["intra_dp_cp_group"],
        data_parallel_group_gloo=None, data_parallel_group_idx=get_pg_rank(groups["mp_group"]),
        distributed_optimizer_instance_id=0)
    inner.bind(optimizer, tp_rank, tp_size)
    optimizer.grad_stats_parallel_group = groups["intra_dist_opt_group"]
    optimizer.tp_group = pg_collection.tp
    optimizer.expert_tp_group = getattr(pg_collection, "expt_tp", pg_collection.tp)
    optimizer.tp_size, optimizer.tp_rank = tp_size, tp_rank
    return ChainedOptimizer([optimizer])
