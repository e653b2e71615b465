"""Checkpoints of a DeepSpeed run with an archopt optimizer that load at another world size.

``engine.save_checkpoint`` / ``engine.load_checkpoint`` resume bit-exactly at the same world size
and ZeRO settings (``optimizer.py``). DeepSpeed's ways to change the world size — elastic
checkpoints and the universal-checkpoint converter — merge optimizer state as flat Adam-like buffers
keyed by DeepSpeed's partitions, which archopt's state is not (per-parameter pieces, and
whole-matrix factors on owner ranks). These two functions write and read a checkpoint in the
complete tensors' coordinates instead, through ``torch.distributed.checkpoint`` (DCP, the format of
``archopt_plugins.optim.checkpoint``):

* every rank writes its own pieces of the fp32 master weights and of the elementwise state as
  ``{fqn}|{key}|{start}`` (flat elements [start, start + numel) of the parameter; replicas write
  once), and the whole-matrix state of the matrices it owns as ``{fqn}|{key}|owner``;
* at load, each rank reads the saved chunks that overlap its own pieces — whatever world size or
  ZeRO stage wrote them — and the owners the new layout assigns read the whole-matrix state; the
  low-precision weights are then refreshed from the masters the way DeepSpeed does after a step.

What is saved: trainable parameters (fp32 masters), optimizer state and hyperparameters, the
engine's step counters, and the LR scheduler's state. Buffers and frozen parameters come from the
model as built (as in ``deepspeed.initialize``).

    save_resharded(engine, "ckpt/step_100")       # collective: every rank
    load_resharded(engine, "ckpt/step_100")       # any world size, any ZeRO stage
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from archopt_plugins.shard.layout import FlatRange

from .optimizer import DeepSpeedArchOpt

META = "archopt_deepspeed.json"
EXTRA = "engine_state.pt"
MASTER = "__master__"


def _optimizer(engine: Any) -> DeepSpeedArchOpt:
    opt = getattr(engine, "basic_optimizer", None)
    if not isinstance(opt, DeepSpeedArchOpt):
        raise ValueError(f"engine's optimizer is {type(opt).__name__}, not an archopt optimizer built from a ds_config "
                         "\"ArchOpt<Name>\" entry; save_resharded/load_resharded serve those only")
    return opt


def _masters(engine: Any, opt: DeepSpeedArchOpt) -> dict[str, tuple[torch.Tensor, FlatRange]]:
    """fqn -> (this rank's fp32 master elements as a flat view, which elements of the parameter they are)."""
    if opt.bridge is not None:
        pieces = opt.bridge.pieces_of_masters()
        return {fqn: (view, opt.bridge.ranges[fqn]) for fqn, view in pieces.items()}
    out = {}
    for group in opt.param_groups:  # whole parameters: the optimizer's own tensors (fp32 copies under bf16)
        for fqn, p in zip(group["param_names"], group["params"]):
            out[fqn] = (p.detach().view(-1), FlatRange(0, p.numel()))
    return out


def _owner_keys(opt: DeepSpeedArchOpt) -> dict[str, set[str]]:
    """Whole-matrix state keys this rank holds as an owner (state keys beyond the kernel's local ones)."""
    from archopt_plugins.planner.rules import get_rule

    owners = getattr(opt.executor, "owners", None) or {}
    rank = dist.get_rank()
    out = {}
    with opt.planned_view():
        for group in opt.param_groups:
            local = set(get_rule(group["rule"]).kernel.local_state_keys) | {"step"}
            for fqn, p in zip(group["param_names"], group["params"]):
                if owners.get(fqn, rank) == rank:
                    extra = {k for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)} - local
                    if extra:
                        out[fqn] = extra
    return out


def save_resharded(engine: Any, directory: str | os.PathLike) -> Path:
    """Write a checkpoint that ``load_resharded`` reads at any world size (collective)."""
    import torch.distributed.checkpoint as dcp

    opt = _optimizer(engine)
    path = Path(directory)
    owned = _owner_keys(opt)
    flat: dict[str, torch.Tensor] = {}
    masters = _masters(engine, opt)
    with opt.planned_view():
        for group in opt.param_groups:
            for fqn, p in zip(group["param_names"], group["params"]):
                view, piece = masters[fqn]
                state = opt.state.get(p, {})
                if piece.numel:
                    flat[f"{fqn}|{MASTER}|{piece.start}"] = view.detach().clone()
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if key in owned.get(fqn, ()):
                        flat[f"{fqn}|{key}|owner"] = value.detach().clone()
                    elif key == "step":
                        flat[f"{fqn}|step|all"] = value.detach().clone()  # the same on every rank
                    elif value.numel() == piece.numel:
                        if piece.numel:
                            flat[f"{fqn}|{key}|{piece.start}"] = value.detach().reshape(-1).clone()
                    else:
                        raise ValueError(f"parameter {fqn!r}: state {key!r} of shape {tuple(value.shape)} is neither "
                                         f"shaped like this rank's piece ({piece.numel} elements) nor whole-matrix "
                                         "state of an owner; save_resharded cannot place it")
    dcp.save(flat, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        scheduler = getattr(engine, "lr_scheduler", None)
        torch.save({"param_groups": groups, "global_steps": engine.global_steps,
                    "global_samples": getattr(engine, "global_samples", 0),
                    "lr_scheduler": scheduler.state_dict() if scheduler is not None else None}, path / EXTRA)
        (path / META).write_text(json.dumps({"format": 1, "world_size": dist.get_world_size(),
                                             "zero_wrapper": opt.zero_wrapper, "optimizer": opt.plan.name,
                                             "plan": {e.fqn: {"rule": e.rule, "shape": list(e.shape)}
                                                      for e in opt.plan.entries}}, indent=1))
    dist.barrier()
    return path


def _saved_chunks(path: Path) -> dict[tuple[str, str], list[tuple[str, int, int]]]:
    """(fqn, key) -> [(storage key, start, numel)] of the flat chunks in a checkpoint."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    out: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
    for name, meta in metadata.state_dict_metadata.items():
        fqn, key, where = name.rsplit("|", 2)
        numel = int(torch.Size(meta.size).numel()) if hasattr(meta, "size") else 0
        start = -1 if where == "owner" else (-2 if where == "all" else int(where))
        out.setdefault((fqn, key), []).append((name, start, numel))
    return out


def load_resharded(engine: Any, directory: str | os.PathLike) -> None:
    """Read a ``save_resharded`` checkpoint into this engine, whatever world size or ZeRO stage wrote it."""
    import torch.distributed.checkpoint as dcp

    opt = _optimizer(engine)
    path = Path(directory)
    meta = json.loads((path / META).read_text())
    plan = {e.fqn: {"rule": e.rule, "shape": list(e.shape)} for e in opt.plan.entries}
    for fqn, entry in plan.items():
        saved = meta["plan"].get(fqn)
        if saved is None:
            raise ValueError(f"checkpoint {path} has no parameter {fqn!r}: saved from another model")
        if saved != entry:
            raise ValueError(f"parameter {fqn!r}: checkpoint has {saved}, this optimizer {entry}; build it from the "
                             "same model with the same ds_config optimizer type and overrides")
    chunks = _saved_chunks(path)
    saved_meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sizes = {name: m.size for name, m in saved_meta.items()}
    dtypes = {name: m.properties.dtype for name, m in saved_meta.items()}
    masters = _masters(engine, opt)
    # Make every rank's executor (layouts, owners) exist before deciding who reads owner state.
    with opt.planned_view():
        executor = opt._executor_for_step()
        if getattr(executor, "layouts", "n/a") is None:
            executor._setup()
    owners = getattr(executor, "owners", None) or {}
    rank = dist.get_rank()
    wanted: dict[str, torch.Tensor] = {}
    for (fqn, key), items in chunks.items():
        piece = masters[fqn][1]
        for name, start, numel in items:
            if start == -1 and owners.get(fqn, rank) != rank:
                continue
            if start >= 0 and not (start < piece.stop and piece.start < start + numel):
                continue
            wanted[name] = torch.empty(sizes[name], dtype=dtypes[name])
    dcp.load(wanted, checkpoint_id=str(path))
    with torch.no_grad(), opt.planned_view():
        for group in opt.param_groups:
            for fqn, p in zip(group["param_names"], group["params"]):
                view, piece = masters[fqn]
                state: dict[str, Any] = {}
                for (f, key), items in chunks.items():
                    if f != fqn:
                        continue
                    if key == MASTER or any(s >= 0 for _, s, _ in items):
                        target = view if key == MASTER else torch.zeros(piece.numel, dtype=torch.float32,
                                                                          device=view.device)
                        for name, start, numel in items:
                            if name not in wanted:
                                continue
                            lo, hi = max(start, piece.start), min(start + numel, piece.stop)
                            target[lo - piece.start:hi - piece.start].copy_(wanted[name][lo - start:hi - start])
                        if key != MASTER:
                            state[key] = target
                    else:
                        for name, start, _ in items:
                            if name in wanted:
                                state[key] = wanted[name].to(view.device)
                if state:
                    opt.state[p] = state
    extra = torch.load(path / EXTRA, weights_only=False)
    for group, saved in zip(opt._groups, extra["param_groups"]):
        group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
    engine.global_steps = extra["global_steps"]
    engine.global_samples = extra["global_samples"]
    if extra["lr_scheduler"] is not None and getattr(engine, "lr_scheduler", None) is not None:
        engine.lr_scheduler.load_state_dict(extra["lr_scheduler"])
    _refresh_low_precision(engine, opt)
    dist.barrier()


def _refresh_low_precision(engine: Any, opt: DeepSpeedArchOpt) -> None:
    """Copy the loaded fp32 masters into the weights the model computes with (DeepSpeed's own copies)."""
    wrapper = engine.optimizer
    name = type(wrapper).__name__
    if name in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        wrapper.update_lp_params()
    elif name == "DeepSpeedZeroOptimizer_Stage3":
        for j in range(len(wrapper.fp16_groups)):
            wrapper._reassign_or_swap_out_partitioned_parameters(j)
    elif name == "FP16_UnfusedOptimizer":
        for fp32_group, low_group in zip(wrapper.fp32_groups, wrapper.fp16_groups):
            for fp32, low in zip(fp32_group, low_group):
                low.data.copy_(fp32.data)
