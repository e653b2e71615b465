"""Geometry diagnostics: what each optimizer step does to each parameter, against the theory.

``GeometryMonitor(optimizer, every=k)`` with ``before_step()`` / ``after_step() -> dict`` is the one
entry point the HF callback, the recipe reports and TensorBoard use (flat metric names such as
``geometry/attn_q/angular_update``); ``write_scalars`` sends such a dict to a TensorBoard writer.
"""

from typing import Any

from .geometry import block_angles, blocks, power_iteration
from .monitor import GeometryMonitor, TrackedParam, tracked_params
from .theory import (EQUILIBRIUM_ANGLE, adamw_equilibrium_angle, fixed_norm_equilibrium_angle,
                     sgd_equilibrium_angle)


def write_scalars(writer: Any, metrics: dict[str, float], step: int) -> None:
    """``writer.add_scalar(name, value, step)`` for each metric (a TensorBoard SummaryWriter or alike)."""
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)


__all__ = ["GeometryMonitor", "TrackedParam", "tracked_params", "write_scalars", "blocks", "block_angles",
           "power_iteration", "EQUILIBRIUM_ANGLE", "adamw_equilibrium_angle", "sgd_equilibrium_angle",
           "fixed_norm_equilibrium_angle"]
