"""Rules of the rest of the non-Euclidean family: Lion, Scion's per-role LMOs, blockwise Adam.

Registered into ``rules.RULES`` at the end of ``rules.py``. Defaults come from the methods'
reference code (REFERENCES.md §3):

* Lion — lr 1e-4, betas (0.9, 0.99), no weight decay (the paper's and lion-pytorch's defaults;
  the paper advises a 3–10× smaller lr and 3–10× larger decay than a tuned AdamW).
* Scion — lr 2⁻¹², momentum 0.9 (Scion's α = 0.1), weight_decay 1.0 (Scion's constrained variant,
  W ← (1−η)·W − η·ρ·lmo), radius ρ (``scale``) 50 for hidden matrices and 3000 for the sign-LMO
  head: the settings of Scion's modded-nanoGPT run (LIONS-EPFL/scion README). Embedding tables use
  ρ = 1, the value of Scion's untied nanoGPT configuration (its modded-nanoGPT run ties the table
  to the head, which then takes the head's sign LMO, as the ``scion`` name does for tied tables).
* blockwise Adam — AdamW's defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0.01), one second
  moment per row.
"""

from __future__ import annotations

from ..update.blockwise_adam import BLOCKS, BlockwiseAdamKernel
from ..update.lion import LionKernel
from ..update.muon import LR_SCALINGS
from ..update.newton_schulz import COEFFICIENT_SETS
from ..update.scion import ScionColNormKernel, ScionRowNormKernel, ScionSignKernel, ScionSpectralKernel
from .hparams import HParam, betas, choice, dtype_name, nonnegative, positive, positive_int, unit_interval
from .rules import RuleSpec

LION = RuleSpec(
    name="lion",
    kernel=LionKernel(),
    min_ndim=0,
    description="sign of a momentum interpolation (steepest descent in the ℓ∞ norm, elementwise)",
    hparams={
        "lr": HParam(1e-4, nonnegative, "learning rate (every coordinate moves by lr)"),
        "betas": HParam((0.9, 0.99), betas, "β₁ interpolates the sign's argument, β₂ is the momentum EMA"),
        "weight_decay": HParam(0.0, nonnegative, "decoupled: W ← (1 − lr·wd)·W"),
    },
)


def _scion_hparams(scale: float, **extra: HParam) -> dict[str, HParam]:
    return {
        "lr": HParam(2.0**-12, nonnegative, "learning rate γ (the step is γ·scale·lmo)"),
        "momentum": HParam(0.9, unit_interval, "EMA coefficient of the averaged gradient (Scion's α = 1 − momentum)"),
        "weight_decay": HParam(1.0, nonnegative,
                               "W ← (1 − lr·wd)·W; 1 = Scion's constrained variant, 0 = unconstrained"),
        "scale": HParam(scale, positive, "radius ρ of the role's norm ball (Scion's per-layer scale)"),
        **extra,
    }


SCION_SPECTRAL = RuleSpec(
    name="scion_spectral",
    kernel=ScionSpectralKernel(),
    min_ndim=2,
    description="Scion, spectral-norm LMO: Newton–Schulz of the averaged gradient (hidden matrices)",
    hparams=_scion_hparams(
        50.0,
        ns_steps=HParam(5, positive_int, "Newton–Schulz iterations"),
        ns_coefficients=HParam("quintic", choice(*COEFFICIENT_SETS), "Newton–Schulz polynomial schedule"),
        lr_scaling=HParam("spectral", choice(*LR_SCALINGS),
                          "spectral: √(m/n) (Scion); shape: √max(1,m/n); match_adamw: 0.2·√max(m,n)"),
        compute_dtype=HParam("auto", dtype_name, "dtype of the Newton–Schulz matmuls ('auto': bf16 on CUDA)"),
    ),
)

SCION_SIGN = RuleSpec(
    name="scion_sign",
    kernel=ScionSignKernel(),
    min_ndim=2,
    description="Scion, sign LMO sign(d)/fan_in (ℓ∞ geometry; output heads)",
    hparams=_scion_hparams(3000.0),
)

SCION_ROWNORM = RuleSpec(
    name="scion_rownorm",
    kernel=ScionRowNormKernel(),
    min_ndim=2,
    description="Scion, each row of the matrix view to unit RMS (embedding tables: one row per token)",
    hparams=_scion_hparams(1.0),
)

SCION_COLNORM = RuleSpec(
    name="scion_colnorm",
    kernel=ScionColNormKernel(),
    min_ndim=2,
    description="Scion, each column of the matrix view to unit RMS (input layers)",
    hparams=_scion_hparams(1.0),
)

BLOCKWISE_ADAM = RuleSpec(
    name="blockwise_adam",
    kernel=BlockwiseAdamKernel(),
    min_ndim=2,
    description="Adam with one second moment per block (row, attention head or tensor)",
    hparams={
        "lr": HParam(1e-3, nonnegative, "learning rate"),
        "betas": HParam((0.9, 0.999), betas, "EMA coefficients of the first moment and the block second moment"),
        "eps": HParam(1e-8, positive, "added to √v̂"),
        "weight_decay": HParam(0.01, nonnegative, "decoupled: W ← (1 − lr·wd)·W"),
        "block": HParam("row", choice(*BLOCKS), "one second moment per row, per attention head, or per tensor"),
    },
)

GEOMETRY_RULES: dict[str, RuleSpec] = {
    r.name: r for r in (LION, SCION_SPECTRAL, SCION_SIGN, SCION_ROWNORM, SCION_COLNORM, BLOCKWISE_ADAM)
}
