"""User overrides: ``{role or FQN glob: {"rule": ..., hyperparameter: value}}``.

A key equal to a role name matches every parameter of that role; any other key is an ``fnmatch``
glob over FQNs (a tied parameter's aliases count). Precedence, lowest first: role keys, then FQN
globs in the order given. Two globs that both match one parameter and set the same key to
different values are a conflict (the parameter is claimed twice) and an error; a key that matches
no parameter is an error too — a typo must never silently leave the default in place.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping

from ..roles.types import ROLES, ParamRole


@dataclass
class Resolved:
    rule: str | None  # None: keep the name's choice
    values: dict[str, Any]  # raw (unconverted) hyperparameters, checked against the final rule later
    sources: dict[str, str]  # hyperparameter/"rule" → the override key that set it


def _validate(overrides: Any) -> dict[str, dict[str, Any]]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping of role or FQN glob to a dict, got {type(overrides).__name__}")
    clean = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"override key {key!r} must be a role name or an FQN glob string")
        if not isinstance(value, Mapping):
            raise ValueError(f"override {key!r}: expected a dict like {{'rule': 'adamw', 'lr': 1e-3}}, got {value!r}")
        clean[key] = dict(value)
    return clean


def _matches(key: str, entry: ParamRole) -> bool:
    if key in ROLES:
        return entry.role == key
    return any(fnmatch.fnmatchcase(name, key) for name in (entry.fqn, *entry.aliases))


def resolve_overrides(overrides: Any, entries: list[ParamRole]) -> dict[str, Resolved]:
    """Per-FQN merged override, after checking every key matches something and nothing conflicts."""
    table = _validate(overrides)
    result = {e.fqn: Resolved(None, {}, {}) for e in entries}
    role_keys = [k for k in table if k in ROLES]
    glob_keys = [k for k in table if k not in ROLES]
    for key in role_keys + glob_keys:
        hits = [e for e in entries if _matches(key, e)]
        if not hits:
            what = f"role {key!r}" if key in ROLES else f"FQN pattern {key!r}"
            roles_present = sorted({e.role for e in entries})
            raise ValueError(f"override {what} matches no trainable parameter; roles present: {roles_present}; "
                             f"example parameter names: {[e.fqn for e in entries[:3]]}")
        for entry in hits:
            slot = result[entry.fqn]
            for name, value in table[key].items():
                previous = slot.sources.get(name)
                if previous is not None and previous not in ROLES and key not in ROLES:
                    old = slot.rule if name == "rule" else slot.values[name]
                    if old != value:
                        raise ValueError(
                            f"parameter {entry.fqn!r} is claimed twice: overrides {previous!r} and {key!r} "
                            f"set {name!r} to {old!r} and {value!r}; make the patterns disjoint")
                if name == "rule":
                    slot.rule = value
                else:
                    slot.values[name] = value
                slot.sources[name] = key
    return result
