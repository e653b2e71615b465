"""Mixture-of-experts blocks: expert weights (stacked 3-D or one module per expert) and routers.

Two storage forms exist in the wild:

* stacked — one module owns 3-D tensors [experts, out, in] (transformers 5.x Mixtral/Qwen-MoE,
  GPT-OSS stores [experts, in, out]); each slice along dim 0 is one expert's matrix;
* listed — a ModuleList of identical expert MLPs (older transformers, Megatron's SequentialMLP).

The router is the sibling holding a 2-D weight with one row per expert. Detection is structural:
the expert count comes from the stacked dimension or the list length, and is checked against the
router's rows: a list of identical blocks with no router beside it is a layer stack, not experts.
"""

from __future__ import annotations

from torch import nn

from .module_kinds import is_embedding, linear_info
from .types import ParamStructure

Assignment = tuple[object, str, ParamStructure]  # (tensor, role, structure)


def _router_in(parent: nn.Module, skip: nn.Module, num_experts: int) -> list[Assignment]:
    """Sibling modules (not ``skip``) whose 2-D weight has ``num_experts`` rows."""
    found: list[Assignment] = []
    for child in parent.children():
        if child is skip or is_embedding(child):
            continue
        weight = getattr(child, "weight", None)
        info = linear_info(child)
        rows = info.fan_out if info is not None else (weight.shape[0] if getattr(weight, "ndim", 0) == 2 else None)
        if rows == num_experts and weight is not None:
            found.append((weight, "router", ParamStructure(transposed=bool(info and info.transposed))))
    return found


def _stacked_orientation(tensors: list, hidden: int | None) -> bool:
    """True when stacked experts are stored [E, in, out] (applied as x @ W) rather than [E, out, in].

    Expert MLPs read and write the model width: in [E, out, in] form the first matrix's last dim
    and the last matrix's middle dim equal it; in [E, in, out] form the reverse. Square or unknown
    widths default to torch's [out, in] convention.
    """
    mats = [t for t in tensors if t.ndim == 3]
    if hidden is None or len(mats) < 2:
        return False
    first, last = mats[0], mats[-1]
    normal = first.shape[2] == hidden and last.shape[1] == hidden
    transposed = first.shape[1] == hidden and last.shape[2] == hidden
    return transposed and not normal


def moe_roles(model: nn.Module, hidden: int | None) -> list[Assignment]:
    """Expert and router assignments for every MoE block in ``model``."""
    found: list[Assignment] = []
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    for module in model.modules():
        own = [p for _, p in module.named_parameters(recurse=False)]
        stacked = [p for p in own if p.ndim == 3]
        if stacked:
            num_experts = stacked[0].shape[0]
            transposed = _stacked_orientation(own, hidden)
            for p in own:
                if p.ndim == 3:
                    found.append((p, "expert", ParamStructure(batch_dims=1, transposed=transposed)))
                elif p.ndim == 2 and p.shape[0] == num_experts:
                    found.append((p, "bias", ParamStructure()))  # per-expert biases [E, out]
            parent = parents.get(id(module))
            if parent is not None:
                found.extend(_router_in(parent, module, num_experts))
            continue
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(module) >= 2:
            members = list(module.children())
            if len({type(m) for m in members}) != 1 or linear_info(members[0]) is not None:
                continue  # a stack of layers or of plain linears, not experts
            parent = parents.get(id(module))
            routers = _router_in(parent, module, len(members)) if parent is not None else []
            if not routers:
                continue  # without a router beside it a list of identical blocks is a layer stack
            found.extend(routers)
            for expert in members:
                for sub in expert.modules():
                    info = linear_info(sub)
                    if info is not None:
                        found.append((info.weight, "expert", ParamStructure(transposed=info.transposed)))
    return found
