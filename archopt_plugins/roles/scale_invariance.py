"""Which weights leave the loss unchanged when scaled: structural detection confirmed by a probe.

A weight W is *scale-invariant* when the model's output does not change if W (or each block of its
rows) is multiplied by any c > 0. That happens when W's output goes straight into a normalization
that divides the scale back out, with nothing in between that does not scale along (no residual
add, no bias, no nonlinearity other than views and reshapes):

* q/k projections under QK-norm: per head (Qwen3: RMSNorm over head_dim → blocks of head_dim rows)
  or as a whole (OLMo2: RMSNorm over all heads' features);
* a linear whose output a LayerNorm/RMSNorm normalizes (OLMo2's o_proj and down_proj, whose norm
  comes *before* the residual add; a post-norm block's LN(x + W·h) is not invariant);
* conv (or linear) before BatchNorm / InstanceNorm (per output channel: blocks of 1 row; the
  per-channel mean subtraction also removes a bias) or GroupNorm (per group of channels).

Structure: one forward of the probe batch with hooks records, for each linear/conv, the tensor it
returns and, for each normalization, the tensor it receives; an edge is a normalization whose input
is the same memory as a producer's output (a view of it, not modified in place since). The
normalization's grouping of features gives the block size. Probe: each candidate's blocks are
multiplied by random factors in [½, 2] with the normalizations' ε set to 0 (invariance holds up to
ε, which tiny models at init do not dwarf); the output must stay within ``tolerance`` (relative) — all
candidates at once, then one by one if that fails — and must move when the candidates are perturbed
by noise (a positive control: a probe blind to them proves nothing). Weights that are zero, or
whose output is also used elsewhere (the probe catches that), are not flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .module_kinds import is_conv, is_norm, linear_info
from .scale_probe import (block_factors, perturb_, preserved, probe_inputs_for, relative_change, run_forward,
                          scale_blocks_, zero_eps)
from .types import ParamStructure

DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Invariance:
    """A confirmed scale-invariant weight: blocks of ``block_rows`` rows of its matrix view."""

    fqn: str
    block_rows: int  # fan_out when the whole matrix is one block
    norm: str  # FQN of the normalization its output feeds
    description: str  # how a person reads it, e.g. "per 16-row block (q_norm over 16 features)"


@dataclass
class InvarianceReport:
    """What detection found, what it refused and why, and how the probe ran."""

    invariant: dict[str, Invariance] = field(default_factory=dict)  # by parameter FQN
    rejected: dict[str, str] = field(default_factory=dict)  # candidate FQN → reason
    note: str = ""

    def get(self, fqn: str) -> Invariance | None:
        return self.invariant.get(fqn)


@dataclass
class _Producer:
    fqn: str  # the module's FQN
    weight: torch.Tensor
    structure: ParamStructure
    fan_out: int
    has_bias: bool
    is_conv: bool


@dataclass
class _Edge:
    producer: _Producer
    norm_fqn: str
    norm: nn.Module
    out_shape: tuple[int, ...]
    norm_input_shape: tuple[int, ...]


def _producers(model: nn.Module) -> dict[int, _Producer]:
    found = {}
    for name, module in model.named_modules():
        info = linear_info(module)
        if info is not None:
            structure = ParamStructure(transposed=info.transposed)
            found[id(module)] = _Producer(name, info.weight, structure, info.fan_out,
                                          getattr(module, "bias", None) is not None, False)
        elif is_conv(module) and not getattr(module, "transposed", False):
            weight = module.weight
            found[id(module)] = _Producer(name, weight, ParamStructure(flatten_kernel=True), weight.shape[0],
                                          module.bias is not None, True)
    return found


def trace_edges(model: nn.Module, inputs: Any, seed: int = 0) -> list[_Edge]:
    """Producer → normalization edges seen in one forward (the structure the probe then checks)."""
    producers = _producers(model)
    norms = {id(m): (name, m) for name, m in model.named_modules() if is_norm(m)}
    outputs: list[tuple[_Producer, torch.Tensor, int]] = []  # references kept: no address reuse
    edges: list[_Edge] = []

    def after_producer(module, _args, output):
        if isinstance(output, torch.Tensor):
            outputs.append((producers[id(module)], output, output._version))

    def before_norm(module, args):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not x.is_contiguous():
            return
        ptr = x.untyped_storage().data_ptr()
        for producer, out, version in outputs:
            if (out.untyped_storage().data_ptr() == ptr and out.numel() == x.numel() and out.is_contiguous()
                    and x.storage_offset() == out.storage_offset() and x._version == version):
                edges.append(_Edge(producer, norms[id(module)][0], module, tuple(out.shape), tuple(x.shape)))

    handles = [m.register_forward_hook(after_producer) for m in model.modules() if id(m) in producers]
    handles += [m.register_forward_pre_hook(before_norm) for m in model.modules() if id(m) in norms]
    try:
        with preserved(model, []):
            run_forward(model, inputs, seed)
    finally:
        for h in handles:
            h.remove()
    return edges


def _mean_removing_per_channel(norm: nn.Module) -> bool:
    """BatchNorm / InstanceNorm (and GroupNorm with one channel per group) subtract a per-channel mean."""
    if isinstance(norm, nn.modules.batchnorm._NormBase):
        return True
    return isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels


def _trailing_normalized(norm: nn.Module) -> int:
    """How many trailing dimensions a LayerNorm/RMSNorm-like module normalizes over (1 for unknown kinds)."""
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return len(shape)
    return 1


def block_rows_of(edge: _Edge) -> tuple[int | None, str]:
    """(rows per invariant block, description) of an edge, or (None, why not)."""
    p, norm, x = edge.producer, edge.norm, edge.norm_input_shape
    kind = type(norm).__name__
    if p.has_bias and not _mean_removing_per_channel(norm):
        return None, f"has a bias before {kind} (its scale does not follow the weight's)"
    if isinstance(norm, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        # channels on dim 1: a conv's output channels, or a linear's features on [N, C]
        channels_ok = len(x) >= 2 and x[1] == p.fan_out and (p.is_conv or len(edge.out_shape) == 2)
        if not channels_ok:
            return None, f"{kind} channels do not line up with the output features"
        if isinstance(norm, nn.GroupNorm):
            rows = p.fan_out // norm.num_groups
            return rows, f"per {rows}-row block ({kind} over {norm.num_groups} groups)"
        return 1, f"per row ({kind}: each output channel)"
    if isinstance(norm, nn.LocalResponseNorm):
        return None, "LocalResponseNorm is not scale-invariant"
    group = math.prod(x[len(x) - _trailing_normalized(norm):])  # consecutive features per normalized group
    if p.is_conv:
        spatial = math.prod(edge.out_shape[2:])
        if spatial % group == 0:
            return 1, f"per row ({kind} within each channel)"
        if group % spatial == 0 and p.fan_out % (group // spatial) == 0:
            rows = group // spatial
            return rows, f"per {rows}-row block ({kind} over {rows} channels)"
        return None, f"{kind} groups of {group} do not align with channels"
    if group <= p.fan_out and p.fan_out % group == 0:
        if group == p.fan_out:
            return group, f"whole matrix ({kind} over all {group} features)"
        return group, f"per {group}-row block ({kind} over {group} features)"
    if group % p.fan_out == 0:
        return p.fan_out, f"whole matrix ({kind} spans whole outputs)"
    return None, f"{kind} groups of {group} do not align with {p.fan_out} output features"


def _param_fqns(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _unprobeable(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            return f"parameters on the meta device ({name!r})"
        if hasattr(p, "ds_shape") or hasattr(p, "ds_id"):
            return f"DeepSpeed ZeRO-3 partitioned parameters ({name!r})"
        if hasattr(p, "full_tensor") or hasattr(p, "_local_tensor"):
            return f"DTensor (sharded) parameters ({name!r}): detect before fully_shard"
    return None


def detect_scale_invariance(model: nn.Module, inputs: Any = None, *, tolerance: float = DEFAULT_TOLERANCE,
                            seed: int = 0) -> InvarianceReport:
    """Scale-invariant weights of ``model`` on a probe batch (``inputs``: a tensor, an args tuple or a
    kwargs dict; HF models default to their ``dummy_inputs``). Leaves the model unchanged."""
    report = InvarianceReport()
    reason = _unprobeable(model)
    probe = probe_inputs_for(model, inputs)
    if reason is None and probe is None:
        reason = "no probe batch (pass probe_inputs=... to plan/build_optimizer; HF models have dummy_inputs)"
    if reason is not None:
        report.note = f"scale-invariance detection did not run: {reason}"
        return report
    param_names = _param_fqns(model)
    edges = trace_edges(model, probe, seed)

    candidates: dict[str, tuple[_Producer, int, str, str]] = {}
    norm_modules = {id(e.norm): e.norm for e in edges}
    for edge in edges:
        fqn = param_names.get(id(edge.producer.weight))
        if fqn is None or not edge.producer.weight.requires_grad:
            continue
        rows, how = block_rows_of(edge)
        if rows is None:
            report.rejected[fqn] = f"feeds {edge.norm_fqn} but {how}"
            continue
        previous = candidates.get(fqn)
        if previous is not None and previous[1] != rows:
            report.rejected[fqn] = f"feeds normalizations with different groupings ({previous[3]}, {edge.norm_fqn})"
            continue
        if float(edge.producer.weight.detach().abs().max()) == 0.0:
            report.rejected[fqn] = "is all zeros: scaling it cannot be probed"
            continue
        candidates[fqn] = (edge.producer, rows, how, edge.norm_fqn)
    for fqn in report.rejected:
        candidates.pop(fqn, None)
    if not candidates:
        report.note = f"scale-invariance probe: {len(edges)} producer→norm edges, no candidates"
        return report
    with zero_eps(list(norm_modules.values())):
        confirmed, rejected = _probe(model, probe, candidates, tolerance, seed)
    report.rejected.update(rejected)
    for fqn in confirmed:
        producer, rows, how, norm_fqn = candidates[fqn]
        report.invariant[fqn] = Invariance(fqn, rows, norm_fqn, how)
    report.note = (f"scale-invariance probe (train mode, norm eps 0, tolerance {tolerance:g}): "
                   f"{len(candidates)} candidates, {len(confirmed)} confirmed")
    return report


def _probe(model: nn.Module, inputs: Any, candidates: dict[str, tuple[_Producer, int, str, str]],
           tolerance: float, seed: int) -> tuple[list[str], dict[str, str]]:
    weights = [c[0].weight for c in candidates.values()]
    gen = torch.Generator().manual_seed(seed)
    with preserved(model, weights):
        reference = run_forward(model, inputs, seed)
        if relative_change(reference, run_forward(model, inputs, seed)) > tolerance / 10:
            return [], {fqn: "probe forward is not deterministic under a fixed seed" for fqn in candidates}

        def change_when_scaled(names: list[str]) -> float:
            originals = [candidates[n][0].weight.detach().clone() for n in names]
            for n in names:
                producer, rows, _, _ = candidates[n]
                factors = block_factors(producer.weight, producer.structure, rows, gen)
                scale_blocks_(producer.weight, producer.structure, rows, factors)
            change = relative_change(reference, run_forward(model, inputs, seed))
            with torch.no_grad():
                for n, original in zip(names, originals):
                    candidates[n][0].weight.copy_(original)
            return change

        names = list(candidates)
        if change_when_scaled(names) <= tolerance:
            confirmed = names
            rejected = {}
        else:
            confirmed, rejected = [], {}
            for n in names:
                change = change_when_scaled([n])
                if change <= tolerance:
                    confirmed.append(n)
                else:
                    rejected[n] = (f"feeds {candidates[n][3]} but scaling its blocks changed the output by "
                                   f"{change:.2e} (relative) > {tolerance:g}: its output is used elsewhere too")
        if confirmed:
            for n in confirmed:
                perturb_(candidates[n][0].weight, gen)
            if relative_change(reference, run_forward(model, inputs, seed)) <= 10 * tolerance:
                return [], {**rejected, **{n: "the probe output does not depend on it (positive control failed)"
                                           for n in confirmed}}
    return confirmed, rejected
