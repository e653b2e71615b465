"""The rotational-equilibrium angle: how far a scale-invariant weight turns per step, from hyperparameters.

For a weight w whose loss ignores its scale, ∇L ⊥ w: an update of size u grows ‖w‖² by u² while
decoupled weight decay shrinks it by 2ηλ‖w‖². The two balance at a norm where the angle turned per
step is fixed by η and λ alone (REFERENCES.md §3; Wan et al. 2021; Kosson et al. 2024):

* SGD with momentum μ (sum form): √(2ηλ/(1+μ));
* AdamW with β₁: √(2ηλ·(1−β₁)/(1+β₁));
* updates of a fixed size (Muon's orthogonalized step, Lion's sign step): √(2ηλ).

The norm relaxes to that equilibrium with time constant 1/(2ηλ) in ‖w‖² (about 1/(ηλ) steps to get
close, within 5% after ~3/(ηλ)). Pure arithmetic; the monitor and the spherical rule share it.
"""

from __future__ import annotations

import math

EQUILIBRIUM_OF = ("muon", "lion", "adamw", "sgd")


def equilibrium_angle(kind: str, lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """Predicted angular update per step (radians) at equilibrium for the base optimizer ``kind``.

    ``momentum`` is μ for ``"sgd"`` and β₁ for ``"adamw"``; fixed-size rules ignore it.
    """
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"equilibrium angle needs lr >= 0 and weight_decay >= 0, got {lr}, {weight_decay}")
    if kind in ("muon", "lion"):
        return math.sqrt(2.0 * lr * weight_decay)
    if kind == "adamw":
        return math.sqrt(2.0 * lr * weight_decay * (1.0 - momentum) / (1.0 + momentum))
    if kind == "sgd":
        return math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))
    raise ValueError(f"equilibrium_of must be one of {list(EQUILIBRIUM_OF)}, got {kind!r}")


def equilibrium_steps(lr: float, weight_decay: float) -> float:
    """1/(ηλ): the time scale, in steps, on which the norm reaches its equilibrium."""
    return math.inf if lr * weight_decay == 0 else 1.0 / (lr * weight_decay)
