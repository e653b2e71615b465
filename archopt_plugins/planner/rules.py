"""Update rules: each binds a kernel (the math in ``update/``) to its hyperparameters and needs.

A rule is what one parameter runs. An optimizer *name* (``names.py``) is a policy that picks a rule
per role; several names share rules. New rules register here with their defaults taken from their
papers (REFERENCES.md §3) and a converter per hyperparameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..update.adamw import AdamWKernel
from ..update.kernel import Kernel, MatrixKernel
from ..update.muon import LR_SCALINGS, MuonKernel
from ..update.newton_schulz import COEFFICIENT_SETS
from .hparams import HParam, betas, choice, dtype_name, nonnegative, positive, positive_int, to_bool, unit_interval

# Options that belong to the optimizer as a whole (every group carries them; not per role).
GLOBAL_HPARAMS: dict[str, HParam] = {
    "nonfinite": HParam("skip", choice("skip", "raise"),
                        "a NaN/Inf gradient skips the whole step (counted) or raises; state is never touched"),
    "comm_dtype": HParam("auto", dtype_name, "dtype of gathered matrices in sharded runs ('auto': bf16 on CUDA)"),
    "sharding": HParam("auto", choice("auto", "exact", "redundant", "blockwise"),
                       "sharded runs: exact owner-based updates (auto), every rank computing every matrix "
                       "(redundant), or each local block alone (blockwise: inexact, by name only)"),
}


@dataclass(frozen=True)
class RuleSpec:
    name: str
    kernel: Kernel
    hparams: Mapping[str, HParam]
    min_ndim: int
    description: str

    def __post_init__(self) -> None:
        # Every matrix rule honours the per-head matrix view (update/matrix_view.py); the switch is
        # added here, so a new rule cannot forget it.
        if isinstance(self.kernel, MatrixKernel) and "per_head" not in self.hparams:
            object.__setattr__(self, "hparams", {**self.hparams, "per_head": PER_HEAD})

    @property
    def needs(self) -> str:
        return self.kernel.needs

    def defaults(self) -> dict[str, Any]:
        return {k: h.default for k, h in self.hparams.items()}

    def check_key(self, key: str, where: str) -> None:
        if key not in self.hparams:
            raise ValueError(f"{where}: unknown hyperparameter {key!r} for rule {self.name!r}; "
                             f"valid: {sorted(self.hparams)}")

    def convert(self, values: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Validate and canonicalise ``values`` (all keys must be this rule's hyperparameters)."""
        out = {}
        for key, value in values.items():
            self.check_key(key, where)
            try:
                out[key] = self.hparams[key].resolve(key, value)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        return out


# The per-head matrix view (update/matrix_view.py); every matrix rule gets it (RuleSpec.__post_init__).
PER_HEAD = HParam(False, to_bool, "attention q/k/v and fused QKV weights are seen as one matrix per head")

MUON = RuleSpec(
    name="muon",
    kernel=MuonKernel(),
    min_ndim=2,
    description="momentum + Newton–Schulz orthogonalization (steepest descent in the spectral norm)",
    hparams={
        "lr": HParam(0.02, nonnegative, "learning rate (scaled per matrix by lr_scaling)"),
        "momentum": HParam(0.95, unit_interval, "EMA coefficient of the momentum buffer"),
        "nesterov": HParam(True, to_bool, "orthogonalize g + μ·(B − g) instead of B"),
        "weight_decay": HParam(0.0, nonnegative, "decoupled: W ← (1 − lr·wd)·W"),
        "ns_steps": HParam(5, positive_int, "Newton–Schulz iterations"),
        "ns_coefficients": HParam("quintic", choice(*COEFFICIENT_SETS), "Newton–Schulz polynomial schedule"),
        "lr_scaling": HParam("shape", choice(*LR_SCALINGS),
                             "shape: √max(1,m/n); spectral: √(m/n); match_adamw: 0.2·√max(m,n)"),
        "compute_dtype": HParam("auto", dtype_name, "dtype of the Newton–Schulz matmuls ('auto': bf16 on CUDA)"),
    },
)

ADAMW = RuleSpec(
    name="adamw",
    kernel=AdamWKernel(),
    min_ndim=0,
    description="Adam moments with decoupled weight decay (elementwise)",
    hparams={
        "lr": HParam(1e-3, nonnegative, "learning rate"),
        "betas": HParam((0.9, 0.999), betas, "EMA coefficients of the first and second moments"),
        "eps": HParam(1e-8, positive, "added to √v̂"),
        "weight_decay": HParam(0.01, nonnegative, "decoupled: W ← (1 − lr·wd)·W"),
    },
)

RULES: dict[str, RuleSpec] = {r.name: r for r in (MUON, ADAMW)}

# Lion, Scion's LMOs and blockwise Adam live in their own module, which builds on RuleSpec above.
from .geometry_rules import GEOMETRY_RULES  # noqa: E402

RULES.update(GEOMETRY_RULES)

# The spherical (fixed-norm) rule for scale-invariant weights, also in its own module.
from .spherical_rule import SPHERICAL_RULES  # noqa: E402

RULES.update(SPHERICAL_RULES)


def get_rule(name: str, where: str = "plan") -> RuleSpec:
    if name not in RULES:
        raise ValueError(f"{where}: unknown rule {name!r}; valid rules: {sorted(RULES)}")
    return RULES[name]


# Structured preconditioners (Shampoo, one-sided Shampoo, SOAP, Adafactor) live in their own module,
# which needs RuleSpec from this one: imported last so the registry holds them wherever RULES is read.
from .preconditioner_rules import PRECONDITIONER_RULES  # noqa: E402

RULES.update({r.name: r for r in PRECONDITIONER_RULES})
