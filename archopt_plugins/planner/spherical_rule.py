"""The spherical (fixed-norm) rule for scale-invariant weights; registered at the end of ``rules.py``.

Defaults: ``lr`` 0.02 — in ``"hyperball"`` mode the relative step per block (the block turns by
atan(lr) ≈ 0.02 rad when the direction is orthogonal to it), the same order as Muon's equilibrium
angle √(2ηλ) for η = 0.02, λ = 0.01; momentum 0.95 with Nesterov and a Newton–Schulz-orthogonalized
direction as in Muon. ``block_rows`` is filled in by the plan from scale-invariance detection (one
head's rows under per-head QK-norm); 0 treats the whole matrix as one block. Cross-checks between
values (no weight decay in ``"hyperball"`` mode, some in ``"equilibrium"`` mode) are made by the
kernel's ``validate_hparams``, which the plan calls.
"""

from __future__ import annotations

from typing import Any

from ..update.equilibrium import EQUILIBRIUM_OF
from ..update.newton_schulz import COEFFICIENT_SETS
from ..update.spherical import DIRECTIONS, MODES, SphericalKernel
from .hparams import HParam, choice, dtype_name, nonnegative, positive_int, to_bool, unit_interval
from .rules import RuleSpec


def nonnegative_int(name: str, value: Any) -> int:
    """An integer >= 0 (strings accepted); 0 is a meaningful value here (the whole matrix)."""
    try:
        return positive_int(name, value) if value not in (0, "0") or isinstance(value, bool) else 0
    except ValueError:
        raise ValueError(f"hyperparameter {name!r}: invalid value {value!r}; expected an integer >= 0") from None


SPHERICAL = RuleSpec(
    name="spherical",
    kernel=SphericalKernel(),
    min_ndim=2,
    description="fixed-norm updates per scale-invariant block: hyperball step, or the rotational-equilibrium "
                "angle of a base optimizer; no weight decay",
    hparams={
        "lr": HParam(0.02, nonnegative, "hyperball: relative step per block (turns by ≈atan(lr)); equilibrium: "
                                        "the base optimizer's lr η"),
        "mode": HParam("hyperball", choice(*MODES), "hyperball: W ← ‖W‖·normalize(W − lr·‖W‖·Ô); equilibrium: "
                                                    "turn by exactly the base optimizer's equilibrium angle"),
        "weight_decay": HParam(0.0, nonnegative, "equilibrium mode only: the base optimizer's λ (the norm stays "
                                                 "fixed; no decay is applied)"),
        "equilibrium_of": HParam("muon", choice(*EQUILIBRIUM_OF),
                                 "base optimizer of the equilibrium angle: muon/lion √(2ηλ), adamw "
                                 "√(2ηλ(1−β₁)/(1+β₁)) with β₁ = momentum, sgd √(2ηλ/(1+μ))"),
        "momentum": HParam(0.95, unit_interval, "EMA coefficient of the momentum buffer (β₁/μ of the base)"),
        "nesterov": HParam(True, to_bool, "use g + μ·(B − g) instead of B as the direction"),
        "direction": HParam("muon", choice(*DIRECTIONS), "muon: Newton–Schulz-orthogonalized momentum; "
                                                         "momentum: the momentum itself"),
        "ns_steps": HParam(5, positive_int, "Newton–Schulz iterations (direction='muon')"),
        "ns_coefficients": HParam("quintic", choice(*COEFFICIENT_SETS), "Newton–Schulz polynomial schedule"),
        "compute_dtype": HParam("auto", dtype_name, "dtype of the Newton–Schulz matmuls ('auto': bf16 on CUDA)"),
        "block_rows": HParam(0, nonnegative_int, "rows per invariant block of the matrix view (0: whole matrix; "
                                                 "set by scale-invariance detection)"),
    },
)

SPHERICAL_RULES = {SPHERICAL.name: SPHERICAL}
