"""Rules of the structured preconditioners: Shampoo, one-sided Shampoo, SOAP, Adafactor.

Registered into ``rules.RULES`` (imported at the end of ``rules.py``). Defaults come from the
papers and the reference implementations (REFERENCES.md §3); where a default is a choice of ours
the doc line says why.
"""

from __future__ import annotations

from typing import Any

from ..update.adafactor import AdafactorKernel
from ..update.shampoo import GRAFTS, STATISTICS, ShampooKernel
from ..update.soap import SoapKernel
from .hparams import HParam, betas, choice, dtype_name, nonnegative, positive, positive_int, to_float, unit_interval
from .rules import RuleSpec


def float_dtype(name: str, value: Any) -> str:
    """'auto' (float32), 'float32' or 'float64': statistics in bf16 would lose their small eigenvalues."""
    v = dtype_name(name, value)
    if v not in ("auto", "float32", "float64"):
        raise ValueError(f"hyperparameter {name!r}: invalid value {value!r}; expected one of "
                         "['auto', 'float32', 'float64'] (preconditioner statistics need float32 or wider)")
    return v


def at_least_one(name: str, value: Any) -> float:
    return to_float(name, value, low=1.0)


def decay_exponent(name: str, value: Any) -> float:
    return to_float(name, value, low=0.0, high=1.0, low_open=True)


def _blocked_common() -> dict[str, HParam]:
    return {
        "precondition_frequency": HParam(10, positive_int, "recompute inverse roots / eigenbases every k steps"),
        "block_size": HParam(1024, positive_int, "largest preconditioner side; bigger matrices are cut into blocks"),
        "root_dtype": HParam("float32", float_dtype,
                             "dtype of the eigendecompositions (float64 is retried when float32 fails)"),
        "compute_dtype": HParam("auto", float_dtype, "dtype of the statistics and preconditioning matmuls"),
    }


def _shampoo_hparams(two_sided: bool) -> dict[str, HParam]:
    hp = {
        "lr": HParam(1e-3, nonnegative, "learning rate (grafted to Adam's step size: Adam-like values)"),
        "betas": HParam((0.9, 0.999), betas, "momentum of the grafted step; EMA of the statistics and graft"),
        "eps": HParam(1e-8, positive, "the Adam graft's denominator epsilon"),
        "matrix_eps": HParam(1e-6, positive, "eigenvalue damping relative to the largest eigenvalue "
                             "(bounds the preconditioner's condition number; survives rank deficiency)"),
        "weight_decay": HParam(0.0, nonnegative, "decoupled: W ← (1 − lr·wd)·W"),
        "statistics": HParam("ema", choice(*STATISTICS),
                             "ema: β₂-averaged G·Gᵀ; sum: Σ G·Gᵀ (AdaGrad-style)"),
        "graft": HParam("adam", choice(*GRAFTS), "adam: Shampoo's direction with Adam's per-block norm; none"),
        **_blocked_common(),
    }
    if two_sided:
        hp["one_sided_ratio"] = HParam(8.0, at_least_one, "blocks longer than this × their shorter side are "
                                       "preconditioned on the shorter side only")
    return hp


SHAMPOO = RuleSpec(
    name="shampoo",
    kernel=ShampooKernel("two_sided"),
    min_ndim=2,
    description="blocked Shampoo: L^(-1/4)·G·R^(-1/4), grafted to Adam's step size",
    hparams=_shampoo_hparams(two_sided=True),
)

ONE_SIDED_SHAMPOO = RuleSpec(
    name="one_sided_shampoo",
    kernel=ShampooKernel("one_sided"),
    min_ndim=2,
    description="one-sided Shampoo: L^(-1/2)·G on each block's shorter side, grafted to Adam's step size",
    hparams=_shampoo_hparams(two_sided=False),
)

SOAP = RuleSpec(
    name="soap",
    kernel=SoapKernel(),
    min_ndim=2,
    description="Adam in the eigenbasis of Shampoo's statistics (refreshed by power iteration + QR)",
    hparams={
        "lr": HParam(3e-3, nonnegative, "learning rate"),
        "betas": HParam((0.95, 0.95), betas, "Adam's moments in the rotated basis; β₂ also averages L and R"),
        "eps": HParam(1e-8, positive, "added to √v"),
        "weight_decay": HParam(0.01, nonnegative, "decoupled: W ← (1 − lr·wd)·W"),
        "one_sided_ratio": HParam(8.0, at_least_one, "blocks longer than this × their shorter side are "
                                  "rotated on the shorter side only"),
        **_blocked_common(),
    },
)

ADAFACTOR = RuleSpec(
    name="adafactor",
    kernel=AdafactorKernel(),
    min_ndim=2,
    description="factored second moment (row and column statistics) with update clipping",
    hparams={
        "lr": HParam(1e-3, nonnegative, "learning rate (no relative step: used as given)"),
        "momentum": HParam(0.0, unit_interval,
                           "EMA of the clipped update (0: none, as in the paper; saves m·n state)"),
        "beta2_decay": HParam(0.8, decay_exponent, "β₂ at step t is 1 − t^(−beta2_decay)"),
        "eps": HParam(1e-30, positive, "added to G² before averaging"),
        "clip_threshold": HParam(1.0, positive, "the update's RMS is clipped to at most this"),
        "weight_decay": HParam(0.0, nonnegative, "decoupled: W ← (1 − lr·wd)·W"),
    },
)

PRECONDITIONER_RULES = (SHAMPOO, ONE_SIDED_SHAMPOO, SOAP, ADAFACTOR)
