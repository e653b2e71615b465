"""Scale invariance in the plan: detection at plan time, the switch that routes invariant weights.

Keywords every optimizer name accepts (``plan``/``build_optimizer``/HF ``--optim_args``):

* ``scale_invariant`` — what to do with weights whose loss ignores their scale
  (``roles.scale_invariance``):

  - ``"detect"`` (default): detect and flag them (``PlanEntry.scale_invariant``, the block size in
    ``invariant_block_rows``, a column in ``Plan.summary()``); their rule is the name's choice;
  - ``"spherical"``: route them to the ``spherical`` rule (hyperball: fixed norm per block, no
    weight decay);
  - ``"equilibrium"``: route them to the ``spherical`` rule in ``mode="equilibrium"``: each block
    turns per step by exactly the equilibrium angle of the rule it would have had, computed from
    that rule's lr, weight decay and momentum (β₁) — Muon √(2ηλ), AdamW √(2ηλ(1−β₁)/(1+β₁)); the
    rotational-equilibrium variant of the base optimizer;
  - ``"off"``: no detection (no probe forward).

* ``probe_inputs`` — the batch the detection probe runs (a tensor, an args tuple or a kwargs dict);
  HF models default to their ``dummy_inputs``.
* ``spherical_<hyperparameter>`` — hyperparameters of the spherical rule where the switch applies
  it (``spherical_lr=0.01``, ``spherical_direction="momentum"`` …).

Precedence: an override or param group that names a ``rule`` wins over the switch; the switch wins
over the name's role policy. Overrides with ``{"rule": "spherical"}`` also get the detected blocks.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..roles.scale_invariance import Invariance, InvarianceReport, detect_scale_invariance
from ..roles.types import ParamStructure
from ..update.equilibrium import EQUILIBRIUM_OF
from ..update.matrix_view import matrix_shape, to_matrices
from .hparams import choice

SWITCH = "scale_invariant"
SWITCH_VALUES = ("detect", "spherical", "equilibrium", "off")
ROUTING = ("spherical", "equilibrium")
SPHERICAL = "spherical"
_PREFIX = SPHERICAL + "_"


def pop_options(hparams: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """Remove (switch, probe_inputs, spherical_* keywords) from the user's keywords."""
    switch = choice(*SWITCH_VALUES)(SWITCH, hparams.pop(SWITCH, "detect"))
    probe = hparams.pop("probe_inputs", None)
    spherical_kw = {k[len(_PREFIX):]: hparams.pop(k) for k in list(hparams) if k.startswith(_PREFIX)}
    return switch, probe, spherical_kw


def detect_for_plan(model: Any, switch: str, probe_inputs: Any) -> InvarianceReport | None:
    """Run detection as the switch asks; None when it is off or the model is not an nn.Module."""
    if switch == "off":
        return None
    if not isinstance(model, nn.Module):
        if switch in ROUTING:
            raise ValueError(f"{SWITCH}={switch!r} needs the nn.Module (detection traces its forward); "
                             "(name, param) pairs or param groups cannot show which weights feed a normalization")
        return InvarianceReport(note="scale invariance not detected: pass the nn.Module")
    try:
        report = detect_scale_invariance(model, probe_inputs)
    except Exception as err:  # noqa: BLE001 — reported in the plan; fatal only when routing depends on it
        if switch in ROUTING:
            raise ValueError(f"{SWITCH}={switch!r}: the scale-invariance probe failed ({type(err).__name__}: {err}); "
                             "pass probe_inputs=<a batch the model's forward accepts>") from err
        return InvarianceReport(note=f"scale-invariance probe failed ({type(err).__name__}: {err}); "
                                     "pass probe_inputs=... to detect")
    if switch in ROUTING and report.note.startswith("scale-invariance detection did not run"):
        raise ValueError(f"{SWITCH}={switch!r}: {report.note}")
    return report


def spherical_values(base_rule: str, base: Mapping[str, Any], switch: str, inv: Invariance | None,
                     spherical_kw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Values for a parameter the switch routes to the spherical rule (before overrides)."""
    values: dict[str, Any] = {}
    if inv is not None:
        values["block_rows"] = inv.block_rows
    if switch == "equilibrium":
        kind = spherical_kw.get("equilibrium_of", base_rule)
        if kind not in EQUILIBRIUM_OF:
            raise ValueError(f"{where}: {SWITCH}='equilibrium' needs the equilibrium angle of its rule {base_rule!r}, "
                             f"which the theory gives only for {list(EQUILIBRIUM_OF)}; pass "
                             "spherical_equilibrium_of=<one of them> (and spherical_lr/spherical_weight_decay)")
        momentum = base.get("momentum", base["betas"][0] if "betas" in base else 0.0)
        values.update(mode="equilibrium", equilibrium_of=kind, lr=base.get("lr", 0.0),
                      weight_decay=base.get("weight_decay", 0.0), momentum=momentum,
                      direction="muon" if base_rule == "muon" else "momentum")
    values.update(spherical_kw)
    return values


def check_spherical_param(param: torch.Tensor, structure: ParamStructure, block_rows: int, where: str) -> None:
    """Refuse at plan time what the spherical rule cannot run: blocks that do not divide, zero blocks."""
    _, rows, _ = matrix_shape(param.shape, structure)
    if block_rows and rows % block_rows:
        raise ValueError(f"{where}: rule 'spherical' with block_rows={block_rows} does not divide its {rows} rows")
    if param.device.type == "meta" or hasattr(param, "ds_shape") or hasattr(param, "full_tensor"):
        return  # no values here to check; the kernel refuses a zero block at the first step
    with torch.no_grad():
        mats = to_matrices(param.detach(), structure)
        size = block_rows or rows
        peaks = mats.reshape(-1, size * mats.shape[-1]).abs().amax(dim=1)
    if bool((peaks == 0).any()):
        raise ValueError(f"{where}: rule 'spherical' keeps each block's norm fixed, and {int((peaks == 0).sum())} "
                         f"block(s) of {size} rows are zero, so they could never move; initialise the weight "
                         "non-zero, or route it to another rule with an override")
