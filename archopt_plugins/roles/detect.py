"""Entry point of role detection: accepts the three kinds of ``model`` DESIGN.md allows.

* an ``nn.Module`` — full structural detection (``structural``);
* an iterable of ``(name, param)`` pairs — roles from names and shapes (``names``);
* plain params, or param groups (dicts with ``"params"``) — roles from shapes only, unless a group
  names its ``"role"``; a group's other keys (``"rule"``, hyperparameters) are carried to the plan
  as that group's overrides. Unnamed params are called ``group{g}.param{i}``.

Frozen parameters (``requires_grad=False``) are left out; a tensor listed twice is an error, except
for tied weights reached under two names, which collapse into one entry with aliases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .names import role_from_name
from .structural import roles_from_module
from .types import ROLES, ParamRole, ParamStructure, RoleMap


def _shape_role(tensor: torch.Tensor) -> tuple[str, ParamStructure]:
    if tensor.ndim <= 1:
        return "vector", ParamStructure()
    if tensor.ndim >= 3:
        return ("conv" if tensor.ndim >= 4 else "hidden"), ParamStructure(flatten_kernel=True)
    return "hidden", ParamStructure()


def _from_named(pairs: list[tuple[str, torch.Tensor]]) -> RoleMap:
    entries: dict[int, ParamRole] = {}
    names_seen: set[str] = set()
    for name, p in pairs:
        if not isinstance(name, str) or not isinstance(p, torch.Tensor):
            raise TypeError(f"expected (name, tensor) pairs, got ({type(name).__name__}, {type(p).__name__})")
        if name in names_seen:
            raise ValueError(f"parameter name {name!r} appears twice in the (name, param) list")
        names_seen.add(name)
        if not p.requires_grad:
            continue
        if id(p) in entries:
            entries[id(p)].aliases += (name,)
            continue
        role, structure = role_from_name(name, p)
        entries[id(p)] = ParamRole(fqn=name, param=p, role=role, structure=structure)
    return RoleMap(params=list(entries.values()), source="names")


def _from_groups(groups: list[Mapping[str, Any]]) -> RoleMap:
    entries: list[ParamRole] = []
    seen: dict[int, str] = {}
    for g, group in enumerate(groups):
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = group.get("param_names")
        if names is not None and len(names) != len(params):
            raise ValueError(f"param group {g}: {len(names)} param_names for {len(params)} params")
        role = group.get("role")
        if role is not None and role not in ROLES:
            raise ValueError(f"param group {g}: unknown role {role!r}; valid roles: {list(ROLES)}")
        options = {k: v for k, v in group.items() if k not in ("params", "param_names", "role")}
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param group {g} holds a {type(p).__name__}, expected tensors")
            fqn = names[i] if names is not None else f"group{g}.param{i}"
            if id(p) in seen:
                raise ValueError(f"parameter {fqn!r} is claimed twice: it is already in the plan as {seen[id(p)]!r}")
            seen[id(p)] = fqn
            if not p.requires_grad:
                continue
            if role is not None:
                structure = ParamStructure(flatten_kernel=p.ndim > 2 and role != "expert",
                                           batch_dims=1 if role == "expert" and p.ndim == 3 else 0)
                found = (role, structure)
            elif names is not None:
                found = role_from_name(fqn, p)
            else:
                found = _shape_role(p)
            entries.append(ParamRole(fqn=fqn, param=p, role=found[0], structure=found[1],
                                     group_options=options))
    any_named = any(g.get("param_names") is not None or g.get("role") is not None for g in groups)
    return RoleMap(params=entries, source="names" if any_named else "shapes")


def detect_roles(model: Any) -> RoleMap:
    """Roles of every trainable parameter of ``model`` (an nn.Module, (name, param) pairs, or params)."""
    if isinstance(model, nn.Module):
        found = roles_from_module(model)
    else:
        if isinstance(model, torch.Tensor):
            raise TypeError("pass an nn.Module, (name, param) pairs, or an iterable of params; got one tensor")
        if not isinstance(model, Iterable):
            raise TypeError(f"cannot plan for a {type(model).__name__}: pass an nn.Module, (name, param) "
                            "pairs, or params / param groups")
        items = list(model)
        if not items:
            raise ValueError("no parameters given")
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
            found = _from_named(items)
        elif all(isinstance(x, Mapping) for x in items):
            found = _from_groups(items)
        elif all(isinstance(x, torch.Tensor) for x in items):
            found = _from_groups([{"params": items}])
        else:
            raise TypeError("mixed input: pass only (name, param) pairs, only tensors, or only param-group dicts")
    if not found.params:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return found
