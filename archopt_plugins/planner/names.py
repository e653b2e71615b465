"""Optimizer names (what ``build_optimizer`` and each stack's config accept) as role → rule policies.

A name gives its matrix rule to the roles whose rows and columns are feature dimensions and AdamW
to the rest (embeddings, output head, norms, biases, routers, undetermined vectors). Keyword
hyperparameters route to the rule they belong to: plain names (``lr``, ``momentum`` …) to the
name's own rule, ``adamw_*`` to the AdamW that runs beside a matrix rule.

Role defaults follow the HF Trainer's convention: norms and biases take no weight decay (override
with ``overrides={"norm": {"weight_decay": ...}}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    def rule_for(self, role: str, ndim: int) -> str:
        if self.main_rule != ADAMW.name and role in self.matrix_roles and ndim >= 2:
            return self.main_rule
        return ADAMW.name

    def rule_defaults(self, rule: str) -> dict[str, Any]:
        """Name-level defaults for a rule before the user's keywords (AdamW beside a matrix rule)."""
        if rule == ADAMW.name and self.main_rule != ADAMW.name:
            return dict(AUX_ADAMW_DEFAULTS)
        return {}

    def route(self, key: str) -> tuple[str, str] | None:
        """(rule, hyperparameter) a keyword configures; ("*", key) for global options; None if unknown."""
        if key in GLOBAL_HPARAMS:
            return ("*", key)
        if key in get_rule(self.main_rule).hparams:
            return (self.main_rule, key)
        if self.main_rule != ADAMW.name and key.startswith("adamw_") and key[6:] in ADAMW.hparams:
            return (ADAMW.name, key[6:])
        return None

    def valid_keywords(self) -> list[str]:
        keys = set(GLOBAL_HPARAMS) | set(get_rule(self.main_rule).hparams) | {"overrides"}
        if self.main_rule != ADAMW.name:
            keys |= {f"adamw_{k}" for k in ADAMW.hparams}
        return sorted(keys)


NAMES: dict[str, OptimizerName] = {
    n.name: n
    for n in (
        OptimizerName("muon", "muon", MATRIX_ROLES,
                      "Muon on hidden/attention/MLP/expert/conv matrices, AdamW on the rest"),
        OptimizerName("adamw", "adamw", frozenset(), "AdamW everywhere (the baseline)"),
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
