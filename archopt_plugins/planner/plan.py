"""roles + name + hyperparameters → Plan: one frozen entry (rule and hyperparameters) per parameter.

Resolution of one parameter's hyperparameters, lowest precedence first:

1. the rule's defaults (``rules.py``), then the name's defaults for it (AdamW beside Muon);
2. the user's keywords routed to that rule (``lr`` → the name's rule, ``adamw_lr`` → AdamW …);
   for a scale-invariant weight that ``scale_invariant="spherical"|"equilibrium"`` sends to the
   spherical rule, its detected blocks, the base rule's lr/λ/β₁ (equilibrium) and ``spherical_*``
   keywords (``invariance.py``);
3. role defaults (norms and biases: no weight decay);
4. a param group's own keys (when params came as groups);
5. overrides by role, then by FQN glob.

Every trainable parameter gets exactly one entry. Errors name the parameter and list valid choices.
``make_plan`` also runs scale-invariance detection on an nn.Module (``roles.scale_invariance``): the
entries carry ``scale_invariant`` and ``invariant_block_rows``, and ``Plan.notes`` what the probe did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from ..roles import RoleMap, detect_roles
from ..roles.scale_invariance import InvarianceReport
from ..roles.types import ROLES, SOURCE_NOTE, ParamStructure
from ..update.kernel import MatrixKernel
from ..update.matrix_view import view_structure
from .names import ROLE_DEFAULTS, OptimizerName, get_name
from .invariance import ROUTING, SPHERICAL, check_spherical_param, detect_for_plan, pop_options, spherical_values
from .overrides import resolve_overrides
from .rules import GLOBAL_HPARAMS, get_rule


@dataclass(frozen=True)
class PlanEntry:
    fqn: str
    shape: tuple[int, ...]
    role: str
    rule: str
    hparams: Mapping[str, Any]
    scale_invariant: bool = False
    structure: ParamStructure = field(default_factory=ParamStructure)
    aliases: tuple[str, ...] = ()
    # Rows per scale-invariant block of the matrix view (fan_out: the whole matrix; 0: not invariant).
    invariant_block_rows: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Plan:
    name: str
    entries: tuple[PlanEntry, ...]
    source: str
    options: Mapping[str, Any]  # optimizer-wide options (nonfinite, comm_dtype)
    notes: tuple[str, ...] = ()  # what plan-time detection did (scale-invariance probe)

    def entry(self, fqn: str) -> PlanEntry:
        for e in self.entries:
            if e.fqn == fqn or fqn in e.aliases:
                return e
        raise KeyError(f"no plan entry for parameter {fqn!r}")

    def rules(self) -> list[str]:
        return sorted({e.rule for e in self.entries})

    @property
    def source_note(self) -> str:
        return SOURCE_NOTE[self.source]

    def summary(self, collapse_layers: bool = True) -> str:
        from .summary import render_summary

        return render_summary(self, collapse_layers=collapse_layers)

    def __str__(self) -> str:
        return self.summary()


def _split_keywords(opt: OptimizerName, hparams: Mapping[str, Any]) -> tuple[dict, dict[str, dict]]:
    """User keywords → (global options, {rule: {hparam: value}}); unknown keywords raise."""
    options: dict[str, Any] = {}
    per_rule: dict[str, dict[str, Any]] = {}
    routed = []
    for key, value in hparams.items():
        targets = opt.targets(key)
        if not targets:
            raise ValueError(f"unknown hyperparameter {key!r} for optimizer {opt.name!r}; "
                             f"valid: {opt.valid_keywords()}")
        routed.append((key, value, targets))
    # Plain keywords first, so a rule-prefixed one (adamw_lr, scion_sign_scale) wins whatever the order.
    routed.sort(key=lambda item: item[2][0][1] != item[0])
    for _, value, targets in routed:
        for rule, name in targets:
            if rule == "*":
                try:
                    options[name] = GLOBAL_HPARAMS[name].resolve(name, value)
                except ValueError as err:
                    raise ValueError(f"optimizer {opt.name!r}: {err}") from None
            else:
                per_rule.setdefault(rule, {})[name] = value
    for key, spec in GLOBAL_HPARAMS.items():
        options.setdefault(key, spec.default)
    return options, per_rule


def build_plan(roles: RoleMap, name: str = "muon", invariance: InvarianceReport | None = None,
               **hparams: Any) -> Plan:
    opt = get_name(name)
    overrides = hparams.pop("overrides", None)
    switch, _, spherical_kw = pop_options(hparams)  # scale_invariant=..., spherical_* (planner/invariance.py)
    if invariance is None and switch in ROUTING:
        raise ValueError(f"scale_invariant={switch!r} needs scale-invariance detection: build the plan with "
                         "make_plan/plan/build_optimizer from the nn.Module")
    options, user = _split_keywords(opt, hparams)
    for rule, values in user.items():  # convert once so a bad value fails before per-parameter work
        get_rule(rule).convert(values, f"optimizer {name!r}")
    resolved = resolve_overrides(overrides, roles.params)

    entries = []
    rules_seen: dict[tuple[str, str], set[str]] = {}
    used: set[tuple[str, str]] = set()
    for p in roles.params:
        where = f"parameter {p.fqn!r} (role {p.role!r})"
        if p.role not in ROLES:
            raise ValueError(f"{where}: unknown role; valid roles: {list(ROLES)}")
        over = resolved[p.fqn]
        group_opts = dict(p.group_options)
        rule_name = (over.rule or group_opts.pop("rule", None)
                     or opt.rule_for(p.role, p.param.ndim, tied=bool(p.aliases)))
        inv = invariance.get(p.fqn) if invariance is not None else None
        base_rule_name = rule_name
        if inv is not None and switch in ROUTING and not (over.rule or p.group_options.get("rule")):
            rule_name = SPHERICAL
        rule = get_rule(rule_name, where)
        if p.param.ndim < rule.min_ndim:
            raise ValueError(f"{where}: rule {rule_name!r} needs a tensor of >= {rule.min_ndim} dimensions, "
                             f"got shape {tuple(p.param.shape)}; route it to 'adamw' with an override")
        values = rule.defaults()
        values.update(opt.rule_defaults(rule_name))
        values.update(user.get(rule_name, {}))
        if rule_name == SPHERICAL:
            base_rule = get_rule(base_rule_name, where)
            base = base_rule.convert({**base_rule.defaults(), **opt.rule_defaults(base_rule_name),
                                      **user.get(base_rule_name, {})}, where)
            routed_by = switch if base_rule_name != rule_name else "detect"
            values.update(spherical_values(base_rule_name, base, routed_by, inv, spherical_kw, where))
        values.update({k: v for k, v in ROLE_DEFAULTS.get(p.role, {}).items() if k in rule.hparams})
        group_opts = {k: v for k, v in group_opts.items() if k not in GLOBAL_HPARAMS}
        values.update(group_opts)
        for key, value in over.values.items():
            # A glob may span rules ("layers.1.*" covers Muon matrices and AdamW norms): each key
            # applies where the parameter's rule has it, and must apply somewhere (checked below).
            origin = (over.sources[key], key)
            rules_seen.setdefault(origin, set()).add(rule_name)
            if key in rule.hparams:
                values[key] = value
                used.add(origin)
        converted = rule.convert(values, where)
        validate = getattr(rule.kernel, "validate_hparams", None)  # checks across values
        if validate is not None:
            validate(converted, where)
        if rule_name == SPHERICAL:
            check_spherical_param(p.param, p.structure, converted["block_rows"], where)
        structure = p.structure
        if isinstance(rule.kernel, MatrixKernel):  # per-head view when the rule's hyperparameters ask for it
            structure = view_structure(structure, converted, where)
        entries.append(PlanEntry(
            fqn=p.fqn, shape=tuple(p.param.shape), role=p.role, rule=rule_name,
            hparams=MappingProxyType(converted), scale_invariant=inv is not None, structure=structure,
            aliases=p.aliases, invariant_block_rows=inv.block_rows if inv is not None else 0,
        ))
    for (source, key), rule_names in rules_seen.items():
        if (source, key) not in used:
            valid = sorted({k for r in rule_names for k in get_rule(r).hparams})
            raise ValueError(f"override {source!r}: hyperparameter {key!r} applies to none of the parameters it "
                             f"matches (their rules: {sorted(rule_names)}); valid for them: {valid}")
    if spherical_kw and not any(e.rule == SPHERICAL for e in entries):
        raise ValueError(f"spherical_* keywords {sorted(spherical_kw)} configure the spherical rule, which no "
                         "parameter runs; pass scale_invariant='spherical' or 'equilibrium' (and check "
                         "Plan.summary() for scale-invariant weights)")
    notes = (invariance.note,) if invariance is not None and invariance.note else ()
    return Plan(name=name, entries=tuple(entries), source=roles.source, options=MappingProxyType(options),
                notes=notes)


def make_plan(model: Any, name: str = "muon", **hparams: Any) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Plan plus the FQN → tensor map the optimizer needs (the plan itself holds no tensors)."""
    roles = detect_roles(model)
    get_name(name)  # an unknown name fails before any probe forward
    switch, probe, _ = pop_options(dict(hparams))
    hparams.pop("probe_inputs", None)
    plan = build_plan(roles, name, invariance=detect_for_plan(model, switch, probe), **hparams)
    return plan, {p.fqn: p.param for p in roles.params}
