"""The numeric side of scale-invariance detection: run a model on a probe batch and compare outputs.

Structural detection (``scale_invariance``) proposes weights whose output feeds a normalization;
this module confirms them: the model's output must not change (within a tolerance) when each
proposed block of rows is multiplied by its own random factor c ∈ [½, 2].

Every forward here leaves the model as it found it: parameters are restored from copies (not by
dividing by c, which would not be bit-exact), buffers (BatchNorm running statistics) are restored,
every module's train/eval mode is restored, and each forward runs under the same forked RNG seed
so dropout masks agree between the forwards being compared. The probe runs in train mode, the
mode training runs in: BatchNorm then normalizes by batch statistics, which is what makes a conv
before it scale-invariant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..update.matrix_view import to_matrices
from .types import ParamStructure


def probe_inputs_for(model: nn.Module, given: Any) -> Any:
    """The probe batch: ``given`` if any, else an HF model's ``dummy_inputs``; None if neither exists."""
    if given is not None:
        return given
    try:
        dummy = getattr(model, "dummy_inputs", None)
    except Exception:  # a property that cannot build its dummies for this config  # noqa: BLE001
        return None
    return dummy if isinstance(dummy, Mapping) and dummy else None


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a probe compares: a plain output, HF's ``logits``, or the first tensor inside."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def preserved(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Restore ``params``, all buffers, and every module's train flag on exit; train mode inside."""
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, copy in zip(params, saved_params):
                p.copy_(copy)
            for b, copy in saved_buffers:
                b.copy_(copy)
        for m, flag in modes:
            m.training = flag


_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")


@contextlib.contextmanager
def zero_eps(norms: list[nn.Module]) -> Iterator[None]:
    """Set the normalizations' epsilon to ~0 (1e-30: BatchNorm refuses 0) inside; restored on exit.

    Invariance is structural: RMSNorm(c·x) = x/√(ms(x) + ε/c²) equals RMSNorm(x) only up to ε,
    which matters while ‖W·x‖² is as small as ε (tiny models at init). The probe asks whether the
    structure is invariant, so it compares with ε = 0; training keeps the real ε.
    """
    saved = []
    for norm in norms:
        for attr in _EPS_ATTRIBUTES:
            value = getattr(norm, attr, None)
            if isinstance(value, float) and not isinstance(value, bool):
                saved.append((norm, attr, value))
                setattr(norm, attr, 1e-30)
    try:
        yield
    finally:
        for norm, attr, value in saved:
            setattr(norm, attr, value)


def run_forward(model: nn.Module, inputs: Any, seed: int) -> torch.Tensor:
    """One forward under a fixed RNG seed; returns the compared output in float64."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        inputs = _to_device(inputs, device)
        if isinstance(inputs, Mapping):
            output = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            output = model(*inputs)
        else:
            output = model(inputs)
    found = first_tensor(output)
    if found is None:
        raise ValueError(f"the probe forward returned {type(output).__name__} without a tensor to compare")
    return found.detach().to(torch.float64)


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(torch.linalg.vector_norm(a))
    return float(torch.linalg.vector_norm(a - b)) / denom if denom > 0 else float("inf")


def block_factors(param: torch.Tensor, structure: ParamStructure, block_rows: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Random factors in [½, 2] (log-uniform), one per block of ``block_rows`` rows of each matrix."""
    batch, rows, _ = to_matrices(param.detach(), structure).shape
    count = batch * (rows // block_rows)
    return torch.exp((torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * 0.6931471805599453)


@torch.no_grad()
def scale_blocks_(param: torch.Tensor, structure: ParamStructure, block_rows: int, factors: torch.Tensor) -> None:
    """Multiply each block of ``block_rows`` rows of ``param``'s matrix view by its factor, in place."""
    mats = to_matrices(param.detach().to(torch.float64), structure)
    batch, rows, cols = mats.shape
    scaled = mats.reshape(-1, block_rows, cols) * factors[:, None, None].to(mats.device)
    scaled = scaled.reshape(batch, rows, cols)
    if structure.transposed:
        scaled = scaled.mT
    param.copy_(scaled.reshape(param.shape).to(param.dtype))


@torch.no_grad()
def perturb_(param: torch.Tensor, generator: torch.Generator, size: float = 0.5) -> None:
    """Add noise of relative size ``size`` (not a scaling): a positive control the output must see."""
    noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.device)
    norm = float(torch.linalg.vector_norm(param.detach().double()))
    noise *= size * norm / max(float(torch.linalg.vector_norm(noise)), 1e-30)
    param.add_(noise.to(param.dtype))
