"""Shared pieces of the parity cases: data, the single-process reference, full parameters, the metric.

Parity (DESIGN.md "Exactness, measured"): the largest per-tensor relative Frobenius difference
‖a − b‖/‖a‖ between the sharded run and the single-process run, fp32 matrix math.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from archopt_plugins import available_optimizers, build_optimizer
from archopt_plugins.planner import get_name

STEPS = 10
GLOBAL_BATCH = 4
SEQ = 12
VOCAB = 64


def names() -> list[str]:
    return available_optimizers()


def hparams(name: str, **extra) -> dict:
    """Defaults, with fp32 matrix math wherever the name has a compute dtype (parity needs it)."""
    hp = dict(extra)
    if get_name(name).route("compute_dtype") is not None:
        hp["compute_dtype"] = "float32"
    return hp


def batches(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def local_part(batch: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    per = batch.shape[0] // parts
    return batch[index * per:(index + 1) * per]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> None:
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


_REFERENCES: dict[tuple, dict[str, torch.Tensor]] = {}


def reference(make_model: Callable[[], nn.Module], name: str, hp: dict) -> dict[str, torch.Tensor]:
    """Single-process run on the global batches (rank 0 only; cached per model, name and hparams)."""
    key = (make_model, name, tuple(sorted(hp.items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference(make_model, name, hp)
    return _REFERENCES[key]


def _reference(make_model: Callable[[], nn.Module], name: str, hp: dict) -> dict[str, torch.Tensor]:
    model = make_model()
    opt = build_optimizer(model, name, **hp)
    assert not opt.executor  # chosen lazily; distributed would pick the engine, so force local below
    from archopt_plugins.optim.executor import LocalExecutor

    opt.executor = LocalExecutor()
    train(model, opt, batches())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Complete parameters (DTensors gathered; a collective every rank must call)."""
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n.replace("module.", "", 1) if n.startswith("module.") else n] = t.detach().clone()
    return out


def parity(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for n, a in ref.items():
        b = got[n]
        rel = float((a - b).norm() / a.norm().clamp_min(1e-30))
        if rel > worst:
            worst, where = rel, n
    return worst, where


def run_parity(make_model: Callable[[], nn.Module], wrap: Callable[[nn.Module], nn.Module], dp_index: int,
               dp_size: int, swap_after_wrap: bool = False, **extra) -> dict:
    """For every optimizer name: the sharded run's parity against the single-process reference."""
    results = {}
    for name in names():
        results[name] = guarded(lambda: _parity_one(make_model, wrap, dp_index, dp_size, swap_after_wrap, name,
                                                    hparams(name, **extra)))
    return results


def guarded(fn: Callable[[], dict | None]) -> dict:
    """Run one name's case; an exception becomes {"error": ...} so the other names still run.

    Every rank raises at the same point for the errors the engine raises by design (they follow
    from identical plans and layouts), so the ranks stay in step.
    """
    import traceback

    try:
        return fn() or {}
    except Exception:
        return {"error": traceback.format_exc(limit=4)}


def _parity_one(make_model, wrap, dp_index, dp_size, swap_after_wrap, name, hp) -> dict | None:
    ref = reference(make_model, name, hp) if dist.get_rank() == 0 else None
    model = make_model()
    if swap_after_wrap:  # the HF Trainer / accelerate order: optimizer first, then FSDP2 swaps params
        opt = build_optimizer(model, name, **hp)
        model = wrap(model)
        current = dict(model.named_parameters())
        for g in opt.param_groups:
            g["params"] = [current[n] for n in g["param_names"]]
    else:
        model = wrap(model)
        inner = model.module if hasattr(model, "module") else model
        opt = build_optimizer(inner, name, **hp)
    train(model, opt, [local_part(b, dp_index, dp_size) for b in batches()])
    got = full_params(model)
    if ref is None:
        return None
    worst, where = parity(ref, got)
    stats = opt.comm_stats
    return {"parity": worst, "worst": where, "bytes_received": stats[1].bytes_received if stats else 0,
            "executor": type(opt.executor).__name__}
