"""Optimizer names (what ``build_optimizer`` and each stack's config accept) as role → rule policies.

A name gives its matrix rule to the roles whose rows and columns are feature dimensions and AdamW
to the rest (embeddings, output head, norms, biases, routers, undetermined vectors); ``role_rules``
gives other roles other rules (Scion's sign LMO for the head, Lion everywhere). Keyword
hyperparameters route to the rules they belong to: plain names (``lr``, ``momentum`` …) to every
rule of the name's family that has them, ``<rule>_<name>`` to one rule (``adamw_lr`` for the AdamW
beside a matrix rule, ``scion_sign_scale``). ``docs/geometry_rules.md`` tabulates the policies.

Role defaults follow the HF Trainer's convention: norms and biases take no weight decay (override
with ``overrides={"norm": {"weight_decay": ...}}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .rules import ADAMW, GLOBAL_HPARAMS, get_rule

MATRIX_ROLES = frozenset({"hidden", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in",
                          "mlp_out", "expert", "conv"})

ROLE_DEFAULTS: dict[str, dict[str, Any]] = {"norm": {"weight_decay": 0.0}, "bias": {"weight_decay": 0.0}}

# AdamW beside a matrix rule: Keller Jordan's Muon-with-aux-Adam settings.
AUX_ADAMW_DEFAULTS = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}


@dataclass(frozen=True)
class OptimizerName:
    name: str
    main_rule: str  # the rule the name's plain hyperparameters configure
    matrix_roles: frozenset[str] = field(default_factory=frozenset)
    description: str = ""
    # Roles that get another rule than ``main_rule``/AdamW, checked first: a role name, "*" (every
    # role), or "tied_embedding" (an embedding table that is also the output head).
    role_rules: Mapping[str, str] = field(default_factory=dict)
    # Plain keywords (``lr``, ``betas`` …) also configure the AdamW on vectors (blockwise Adam:
    # one optimizer's settings, not an auxiliary AdamW with its own).
    shares_adamw: bool = False
    # Rules no role gets by default that an override may pick (``{"embedding": {"rule": "scion_colnorm"}}``);
    # the name's plain keywords configure them too.
    extra_rules: tuple[str, ...] = ()

    def rule_for(self, role: str, ndim: int, tied: bool = False) -> str:
        keys = ("tied_embedding", role, "*") if tied and role == "embedding" else (role, "*")
        for key in keys:
            rule = self.role_rules.get(key)
            if rule is not None and ndim >= get_rule(rule).min_ndim:
                return rule
        if self.main_rule != ADAMW.name and role in self.matrix_roles and ndim >= 2:
            return self.main_rule
        return ADAMW.name

    def family(self) -> list[str]:
        """Rules the name's plain keywords configure: its own rules (and AdamW when it shares)."""
        rules = [self.main_rule, *self.role_rules.values(), *self.extra_rules]
        if self.shares_adamw and ADAMW.name not in rules:
            rules.append(ADAMW.name)
        return list(dict.fromkeys(rules))

    def _prefixed_rules(self) -> list[str]:
        """Rules a ``<rule>_<hyperparameter>`` keyword may address (the AdamW beside, and each rule of
        a name with several, e.g. ``scion_sign_scale``)."""
        rules = self.family() if len(self.family()) > 1 else []
        if self.main_rule != ADAMW.name and "*" not in self.role_rules:
            rules.append(ADAMW.name)
        return sorted(set(rules), key=len, reverse=True)  # longest first: scion_sign before scion

    def rule_defaults(self, rule: str) -> dict[str, Any]:
        """Name-level defaults for a rule before the user's keywords (AdamW beside a matrix rule)."""
        if rule == ADAMW.name and self.main_rule != ADAMW.name and not self.shares_adamw:
            return dict(AUX_ADAMW_DEFAULTS)
        return {}

    def targets(self, key: str) -> list[tuple[str, str]]:
        """Every (rule, hyperparameter) a keyword configures; [("*", key)] for global options; [] if unknown.

        A plain keyword configures each rule of the name's family that has it; a prefixed one
        (``adamw_lr``, ``scion_sign_scale``) configures that rule only.
        """
        if key in GLOBAL_HPARAMS:
            return [("*", key)]
        plain = [(rule, key) for rule in self.family() if key in get_rule(rule).hparams]
        if plain:
            return plain
        for rule in self._prefixed_rules():
            rest = key[len(rule) + 1:]
            if key.startswith(rule + "_") and rest in get_rule(rule).hparams:
                return [(rule, rest)]
        return []

    def route(self, key: str) -> tuple[str, str] | None:
        """(rule, hyperparameter) a keyword configures (the first, see ``targets``); None if unknown."""
        found = self.targets(key)
        return found[0] if found else None

    def valid_keywords(self) -> list[str]:
        keys = set(GLOBAL_HPARAMS) | {"overrides"}
        for rule in self.family():
            keys |= set(get_rule(rule).hparams)
        for rule in self._prefixed_rules():
            keys |= {f"{rule}_{k}" for k in get_rule(rule).hparams}
        return sorted(keys)


NAMES: dict[str, OptimizerName] = {
    n.name: n
    for n in (
        OptimizerName("muon", "muon", MATRIX_ROLES,
                      "Muon on hidden/attention/MLP/expert/conv matrices, AdamW on the rest"),
        OptimizerName("adamw", "adamw", frozenset(), "AdamW everywhere (the baseline)"),
        OptimizerName("spherical", "spherical", MATRIX_ROLES,
                      "fixed-norm (hyperball) Muon-direction steps on hidden/attention/MLP/expert/conv "
                      "matrices, AdamW on the rest"),
        OptimizerName("lion", "lion", description="Lion on every parameter (embeddings, head and norms too, as "
                      "in the Lion paper)", role_rules={"*": "lion"}),
        OptimizerName("scion", "scion_spectral", MATRIX_ROLES,
                      "Scion: spectral LMO on hidden/attention/MLP/expert/conv matrices, sign on the output "
                      "head (and on an embedding tied to it), unit-RMS rows on embedding tables, AdamW on "
                      "norms, biases and routers",
                      role_rules={"output": "scion_sign", "tied_embedding": "scion_sign",
                                  "embedding": "scion_rownorm"},
                      extra_rules=("scion_colnorm",)),
        OptimizerName("blockwise_adam", "blockwise_adam", MATRIX_ROLES | {"embedding", "output", "router"},
                      "Adam with one second moment per row (per head or per tensor with block=...) on every "
                      "matrix, AdamW on vectors with the same settings", shares_adamw=True),
        OptimizerName("shampoo", "shampoo", MATRIX_ROLES,
                      "blocked Shampoo (Adam-grafted) on matrices, AdamW on the rest"),
        OptimizerName("one_sided_shampoo", "one_sided_shampoo", MATRIX_ROLES,
                      "one-sided Shampoo (shorter side, L^-1/2) on matrices, AdamW on the rest"),
        OptimizerName("soap", "soap", MATRIX_ROLES,
                      "SOAP (Adam in Shampoo's eigenbasis) on matrices, AdamW on the rest"),
        OptimizerName("adafactor", "adafactor", MATRIX_ROLES,
                      "Adafactor (factored second moment) on matrices, AdamW on the rest"),
    )
}


def available_optimizers() -> list[str]:
    """Every name ``build_optimizer`` accepts (and HF ``archopt_<name>``, DeepSpeed ``ArchOpt<Name>``)."""
    return sorted(NAMES)


def get_name(name: str) -> OptimizerName:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown optimizer {name!r}; available: {available_optimizers()}")
    return NAMES[name]
