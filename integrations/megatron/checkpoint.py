"""``ArchOptDistributedOptimizer``: Megatron's DistributedOptimizer around archopt, with archopt's checkpoint format.

Megatron's distributed-optimizer checkpoint formats assume Adam (``exp_avg``/``exp_avg_sq`` shaped
like the parameter) or flat buffers tied to one data-parallel layout. archopt keeps two kinds of
state: elementwise state shaped like each rank's piece (momentum, Adam moments) and state that
lives with a whole matrix on its owner rank (Shampoo/SOAP factors). ``sharded_state_dict`` gives
Megatron's distributed checkpointing (``dist_checkpointing.save/load``, ``torch_dist`` strategy)

* every piece of the fp32 main parameters and of the elementwise state as a 1-D ``ShardedTensor``
  of its parameter: each TP shard flattened, the shards in TP-rank order, this rank's range of it
  (irregular 1-D shards, which ``torch_dist`` reshards);
* owner state as a ``ShardedTensor`` of its full shape, written by its owner;
* the rest (group hyperparameters, step counts, skipped steps, the TP size) as common state.

Keys are ``optimizer.archopt.<kind>.<state key>.<parameter FQN>``, independent of the data-parallel
layout, so a checkpoint loads at another data-parallel size (other flat ranges, other owners); the
tensor-parallel size must be the same (checked when loading). Loading into a fresh optimizer first
creates every state tensor with a step at lr 0 on zero gradients (``MegatronInnerOptimizer.init_state``).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from archopt_plugins.planner import get_rule

from .layout import split_dim

FORMAT = 1
_PREFIX = "optimizer.archopt"


def _flat_shard(key: str, data: torch.Tensor, global_numel: int, offset: int, replica: int) -> ShardedTensor:
    return ShardedTensor(key=key, data=data, dtype=data.dtype, local_shape=(data.numel(),),
                         global_shape=(global_numel,), global_offset=(offset,), axis_fragmentations=None,
                         replica_id=(0, replica, 0))


def _has_state(archopt: Any) -> bool:
    """Whether every planned parameter has its state (it is created at the first step)."""
    params = [p for g in archopt.param_groups for p in g["params"]]
    return all(archopt.state.get(p) for p in params)


class ArchOptDistributedOptimizer(DistributedOptimizer):
    """See ``optimizer.py`` for the step and this module's docstring for checkpoints."""

    tp_size: int = 1
    tp_rank: int = 0

    # -- what each rank holds ----------------------------------------------------------------------
    def _placements(self):
        """(fqn, model param, main shard or None, offset in the flattened complete tensor, complete numel, replica)."""
        inner = self.optimizer
        model_params = {n: p for g in inner.archopt.param_groups for n, p in zip(g["param_names"], g["params"])}
        for _, name, shard in inner.bound:
            param = model_params[name]
            split = split_dim(param, self.tp_size) is not None
            numel = param.numel() * (self.tp_size if split else 1)
            offset = self.tp_rank * param.numel() if split else 0
            if shard is not None:
                offset += self._get_model_param_range_map(param)["param"].start
            # a weight every TP rank holds whole is written by TP rank 0 only
            replica = 0 if split else self.tp_rank
            yield name, param, shard, offset, numel, replica

    # -- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        inner = self.optimizer
        archopt = inner.archopt
        steps = {}
        for group in archopt.param_groups:
            for name, param in zip(group["param_names"], group["params"]):
                step = archopt.state.get(param, {}).get("step")
                steps[name] = int(step.item()) if isinstance(step, torch.Tensor) else 0
        state = {"archopt_format": FORMAT, "optimizer_name": archopt.plan.name, "tp_size": self.tp_size,
                 "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups],
                 "archopt_groups": [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                                    for g in archopt.param_groups],
                 "steps": steps}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def sharded_state_dict(self, model_sharded_state_dict: Any = None, is_loading: bool = False,
                           sharding_type: Any = None, metadata: Any = None) -> dict[str, Any]:
        inner = self.optimizer
        archopt = inner.archopt
        if is_loading and not _has_state(archopt):
            inner.init_state()  # a fresh optimizer: create the tensors the checkpoint is read into
        kernels = {n: get_rule(archopt._entries[n].rule).kernel for n in archopt._entries}
        param_state: dict[str, dict[str, ShardedTensor]] = {}
        for name, param, shard, offset, numel, replica in self._placements():
            tensors: dict[str, ShardedTensor] = {}
            state = archopt.state.get(param, {})
            local_keys = set(kernels[name].local_state_keys)
            if shard is not None and shard.numel():
                tensors["fp32_param"] = _flat_shard(f"{_PREFIX}.fp32_param.{name}", shard, numel, offset, replica)
            for key, value in state.items():
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                if key in local_keys:
                    if shard is not None and value.numel() == shard.numel() and value.numel():
                        tensors[f"state.{key}"] = _flat_shard(f"{_PREFIX}.state.{key}.{name}", value.view(-1),
                                                              numel, offset, replica)
                else:  # owner state: the whole value, on the owner rank only
                    tensors[f"owner.{key}"] = ShardedTensor.from_rank_offsets(
                        f"{_PREFIX}.owner.{key}.{name}", value, replica_id=0)
            if tensors:
                param_state[name] = tensors
        return {"common": self.state_dict(), "param_state": param_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        common = state_dict.get("common", state_dict)
        if common.get("archopt_format") != FORMAT:
            raise ValueError("this checkpoint's optimizer state was not saved by the archopt Megatron adapter "
                             f"(format {common.get('archopt_format')!r}, expected {FORMAT})")
        inner = self.optimizer
        archopt = inner.archopt
        if common["optimizer_name"] != archopt.plan.name:
            raise ValueError(f"checkpoint optimizer is archopt_{common['optimizer_name']}, this one "
                             f"archopt_{archopt.plan.name}: build the optimizer with the same name")
        if common["tp_size"] != self.tp_size:
            raise ValueError(f"checkpoint was saved at tensor-parallel size {common['tp_size']}, this run has "
                             f"{self.tp_size}: archopt's Megatron checkpoints reshard over data-parallel sizes "
                             "only; load it with the same tensor_model_parallel_size")
        saved_groups = common["archopt_groups"]
        if [g["rule"] for g in saved_groups] != [g["rule"] for g in archopt.param_groups]:
            raise ValueError(f"checkpoint param groups have rules {[g['rule'] for g in saved_groups]}, this "
                             f"optimizer {[g['rule'] for g in archopt.param_groups]}: saved from another plan")
        missing = sorted(set(archopt._entries) - set(common["steps"]))
        if missing:
            raise ValueError(f"checkpoint has no state for parameter {missing[0]!r}: saved from another model")
        for ours, saved in zip(inner.param_groups, common["param_groups"]):
            ours.update({k: v for k, v in saved.items() if k != "params"})
        for ours, saved in zip(archopt.param_groups, saved_groups):
            ours.update(saved)
        if self.grad_scaler is not None and "grad_scaler" in common:
            self.grad_scaler.load_state_dict(common["grad_scaler"])
        if not _has_state(archopt):
            inner.init_state()
        loaded = state_dict.get("param_state", {})
        with torch.no_grad():
            for name, param, shard, _, _, _ in self._placements():
                state = archopt.state[param]
                state["step"] = torch.tensor(float(common["steps"][name]), dtype=torch.float32)
                for key, value in loaded.get(name, {}).items():
                    if key == "fp32_param":
                        shard.copy_(value.view_as(shard))
                    else:
                        _, state_key = key.split(".", 1)
                        state[state_key].copy_(value.view_as(state[state_key]))
            self._copy_main_params_to_model_params()
        for chunk in self.model_chunks:  # Megatron's own all-gather: every rank gets the loaded parameters
            chunk.start_param_sync(force_sync=True)

    def reload_model_params(self, state_dict: Any = None) -> None:
        """Main parameters from the (already loaded) model parameters, as Megatron's optimizers do."""
        self._copy_model_params_to_main_params()
