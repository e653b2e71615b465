"""What the theory predicts for a parameter's geometry, next to what the monitor measures.

For a weight w whose loss is invariant to its scale (it feeds a normalization), ∇L ⊥ w, so an
update grows ‖w‖ while weight decay shrinks it; the two balance, and at that equilibrium the
angle w turns per step is fixed by the hyperparameters alone (REFERENCES.md §3; Wan et al. 2021,
Kosson et al. 2024 "Rotational equilibrium"):

* SGD with momentum μ (sum form, L2 or decoupled decay): √(2ηλ/(1+μ));
* AdamW with β₁: √(2ηλ·(1−β₁)/(1+β₁));
* updates of fixed size (Muon's orthogonalized step, Lion's sign): √(2ηλ);

reached after about 1/(ηλ) steps (``update.equilibrium`` has the formulas). Also the
bounds the iterates end inside: AdamW (and sign descent) ‖W‖∞ ≤ 1/λ, Muon with decoupled decay
‖W‖₂ ≤ s/λ (s its lr scale). The monitor reports these as

* ``equilibrium_angular_update`` — the predicted angle per step (radians);
* ``equilibrium_steps`` — 1/(ηλ) at the current η;
* ``equilibrium_progress`` — Σₜ ηₜλ since the monitor started (≳ 3: equilibrium reached);
* ``linf_bound`` — ‖W‖∞·λ for AdamW/Lion-like rules (theory: ≤ 1 at convergence);
* ``spectral_bound`` — ‖W‖₂·λ/s for Muon (theory: ≤ 1), ‖W‖₂ by warm-started power iteration.

Predictions hold for scale-invariant weights; for the others they are reference values. A rule may
register its own prediction in ``EQUILIBRIUM_ANGLE`` (the spherical rule does).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..update.equilibrium import equilibrium_angle
from ..update.matrix_view import to_matrices
from .geometry import power_iteration

Group = dict[str, Any]


def _momentum(group: Group) -> float:
    return float(group.get("momentum", 0.0) or 0.0)


def _beta1(group: Group) -> float:
    betas = group.get("betas", (0.9, 0.999))
    return float(betas[0])


def sgd_equilibrium_angle(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """√(2ηλ/(1+μ)): SGD with (sum-form) momentum μ on a scale-invariant weight."""
    return equilibrium_angle("sgd", lr, weight_decay, momentum)


def adamw_equilibrium_angle(lr: float, weight_decay: float, beta1: float) -> float:
    """√(2ηλ(1−β₁)/(1+β₁)): AdamW on a scale-invariant weight."""
    return equilibrium_angle("adamw", lr, weight_decay, beta1)


def fixed_norm_equilibrium_angle(lr: float, weight_decay: float) -> float:
    """√(2ηλ): updates of a fixed size per step (Muon, Lion) on a scale-invariant weight."""
    return equilibrium_angle("muon", lr, weight_decay)


def _spherical_angle(group: Group) -> float:
    from ..update.spherical import predicted_angle

    return predicted_angle(group)


# rule name → predicted equilibrium angle per step from the group's hyperparameters (None: no prediction)
EQUILIBRIUM_ANGLE: dict[str, Callable[[Group], float | None]] = {
    "adamw": lambda g: adamw_equilibrium_angle(g["lr"], g.get("weight_decay", 0.0), _beta1(g)),
    "sgd": lambda g: sgd_equilibrium_angle(g["lr"], g.get("weight_decay", 0.0), _momentum(g)),
    "muon": lambda g: fixed_norm_equilibrium_angle(g["lr"], g.get("weight_decay", 0.0)),
    "lion": lambda g: fixed_norm_equilibrium_angle(g["lr"], g.get("weight_decay", 0.0)),
    # the spherical rule turns by atan(lr) (hyperball) or by θ (equilibrium mode) from the first step
    "spherical": _spherical_angle,
}
# Rules that hold the norm fixed: no relaxation towards an equilibrium norm to time.
FIXED_NORM_RULES = frozenset({"spherical"})

# Rules whose iterates end in an ℓ∞ ball of radius 1/λ (sign-like updates of bounded size).
LINF_RULES = frozenset({"adamw", "lion"})
# Rules with orthogonalized updates whose iterates end in a spectral ball of radius s/λ.
SPECTRAL_RULES = frozenset({"muon"})


class TheoryTracker:
    """Predictions per parameter; keeps Σηλ per group and warm power-iteration vectors."""

    def __init__(self, optimizer: Any, spectral: bool = True, power_iters: int = 2) -> None:
        self.optimizer = optimizer
        self.spectral = spectral
        self.power_iters = power_iters
        self._progress: dict[int, float] = {}
        self._vectors: dict[int, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(0)

    def advance(self) -> None:
        """One optimizer step happened: accumulate ηλ per group."""
        for group in self.optimizer.param_groups:
            decay = float(group.get("lr", 0.0)) * float(group.get("weight_decay", 0.0) or 0.0)
            self._progress[id(group)] = self._progress.get(id(group), 0.0) + decay

    def predict(self, t: Any, weight: torch.Tensor) -> dict[str, float]:
        """Predicted and bound metrics of one tracked parameter (see the module docstring)."""
        group = t.group
        lr = float(group.get("lr", 0.0))
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        out: dict[str, float] = {}
        angle_fn = EQUILIBRIUM_ANGLE.get(t.rule)
        if angle_fn is not None:
            angle = angle_fn(group)
            if angle is not None:
                out["equilibrium_angular_update"] = angle
        if lr > 0 and wd > 0 and t.rule not in FIXED_NORM_RULES:
            out["equilibrium_steps"] = 1.0 / (lr * wd)
            out["equilibrium_progress"] = self._progress.get(id(group), 0.0)
            if t.rule in LINF_RULES:
                out["linf_bound"] = float(weight.detach().abs().max()) * wd
            if self.spectral and t.rule in SPECTRAL_RULES and weight.ndim >= 2:
                out["spectral_bound"] = self.spectral_norm(t, weight) * wd / self._lr_scale(t, weight)
        return out

    def spectral_norm(self, t: Any, weight: torch.Tensor) -> float:
        """Largest spectral norm over the matrices of ``weight`` (warm-started power iteration)."""
        mats = to_matrices(weight.detach(), t.structure)
        sigma, v = power_iteration(mats, self._vectors.get(id(t.param)), self.power_iters, self._generator)
        self._vectors[id(t.param)] = v
        return float(sigma.max())

    @staticmethod
    def _lr_scale(t: Any, weight: torch.Tensor) -> float:
        from ..update.matrix_view import matrix_shape
        from ..update.muon import lr_scale

        _, fan_out, fan_in = matrix_shape(weight.shape, t.structure)
        return lr_scale(fan_out, fan_in, t.group.get("lr_scaling", "shape"))
