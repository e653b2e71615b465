"""Spherical updates: each scale-invariant block of a weight moves on the sphere of its own norm.

A weight that feeds a normalization (``roles.scale_invariance``) has a loss that ignores its scale,
so only its direction matters. Weight decay then only steers the effective step size η/‖w‖²
towards an equilibrium. The spherical rule drops that indirection: it keeps ‖w_b‖ of every block b
(the whole matrix, or one head's rows under per-head QK-norm) fixed at its initial value, takes no
weight decay, and sets the step by an angle directly. Two modes:

* ``"hyperball"`` (REFERENCES.md §3): w_b ← r_b·normalize(w_b − η·r_b·ô_b) with r_b = ‖w_b‖ and
  ô_b the block's unit direction; the block turns by atan(η) when ô_b ⊥ w_b;
* ``"equilibrium"`` (rotational equilibrium, Kosson et al. 2024): the geodesic step that turns each
  block by exactly θ = the angle the base optimizer (``equilibrium_of``, with this rule's ``lr``,
  ``weight_decay``, ``momentum``) reaches at equilibrium (``update.equilibrium``): the equilibrium
  from the first step, and LR schedules act on θ through η as they would on the base optimizer:
      t_b = −ô_b + ⟨ô_b, ŵ_b⟩·ŵ_b,   w_b ← cos θ·w_b + sin θ·r_b·t_b/‖t_b‖.

The direction is the momentum (EMA, Nesterov optional), orthogonalized by Newton–Schulz on the whole
matrix when ``direction="muon"`` (then cut into blocks), as is with ``direction="momentum"``.

Needs (DESIGN.md): *reductions* — per-block ‖w_b‖ and ⟨ô_b, w_b⟩ beside the direction. The kernel
asks the executor for the complete parameter in ``transform`` (``transform_needs_param``), computes
the new weight there on complete matrices (exact: one process, or the owner rank of a sharded
run), and returns the difference; ``apply`` adds it to the local piece. Blocks are rows of the
matrix view, so stored layouts ([in, out], conv kernels, stacked experts) need nothing special.
"""

from __future__ import annotations

import math

import torch

from .equilibrium import equilibrium_angle
from .kernel import HParams, MatrixBatch, MatrixKernel, resolve_dtype, zeros_state
from .muon import momentum_direction_
from .newton_schulz import newton_schulz, newton_schulz_reference

DIRECTIONS = ("muon", "momentum")
MODES = ("hyperball", "equilibrium")


def normalize_row_blocks(mats: torch.Tensor, block_rows: int) -> torch.Tensor:
    """[N, m, n] with each block of ``block_rows`` rows (0: the whole matrix) scaled to unit Frobenius
    norm; zero blocks stay zero."""
    n_mats, rows, cols = mats.shape
    size = block_rows or rows
    flat = mats.reshape(n_mats * (rows // size), size * cols)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    unit = torch.where(norms > 0, flat / norms.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return unit.reshape(n_mats, rows, cols)


def _block_norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=1)


def _safe_div(num: torch.Tensor, den: torch.Tensor, fallback: float) -> torch.Tensor:
    """num / den where den > 0, else ``fallback`` (a zero block or a zero direction stays put)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(den, fallback))


def hyperball_step(w: torch.Tensor, unit: torch.Tensor, lr: float) -> torch.Tensor:
    """w_b ← r_b·normalize(w_b − lr·r_b·unit_b), per row of [blocks, block_numel]."""
    r = _block_norms(w)
    moved = w - lr * r[:, None] * unit
    return moved * _safe_div(r, _block_norms(moved), 1.0)[:, None]


def geodesic_step(w: torch.Tensor, unit: torch.Tensor, theta: float) -> torch.Tensor:
    """Turn each block of w by exactly ``theta`` towards −unit within the sphere of its norm."""
    r = _block_norms(w)
    w_hat = w * _safe_div(torch.ones_like(r), r, 0.0)[:, None]
    tangent = -unit + (unit * w_hat).sum(dim=1, keepdim=True) * w_hat  # −unit minus its radial part
    t_norm = _block_norms(tangent)
    moves = t_norm > 0
    cos = torch.where(moves, torch.full_like(r, math.cos(theta)), torch.ones_like(r))
    step = _safe_div(math.sin(theta) * r, t_norm, 0.0)
    return cos[:, None] * w + step[:, None] * tangent


def step_angle(hp: HParams) -> float:
    """The angle parameter of this step: η for the hyperball, θ for the equilibrium mode."""
    if hp["mode"] == "hyperball":
        return hp["lr"]
    return equilibrium_angle(hp["equilibrium_of"], hp["lr"], hp["weight_decay"], hp["momentum"])


def predicted_angle(hp: HParams) -> float:
    """Angle per step the rule produces when the direction is orthogonal to w (the monitor's prediction)."""
    return math.atan(hp["lr"]) if hp["mode"] == "hyperball" else step_angle(hp)


class SphericalKernel(MatrixKernel):
    needs = "reductions"
    transform_needs_param = True
    transform_keys = ("direction", "ns_steps", "ns_coefficients", "compute_dtype", "block_rows", "mode", "lr",
                      "weight_decay", "momentum", "equilibrium_of")
    local_state_keys = ("momentum_buffer",)

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": zeros_state(param)}

    def validate_hparams(self, hp: HParams, where: str) -> None:
        """Cross-checks the per-value converters cannot make (the plan calls this after conversion)."""
        if hp["mode"] == "hyperball" and hp["weight_decay"] != 0.0:
            raise ValueError(f"{where}: rule 'spherical' keeps each block's norm fixed and takes no weight decay, "
                             f"got weight_decay={hp['weight_decay']}; weight_decay only sets the angle of "
                             "mode='equilibrium' (set weight_decay=0, or mode='equilibrium')")
        if hp["mode"] == "equilibrium" and hp["weight_decay"] == 0.0:
            raise ValueError(f"{where}: rule 'spherical' with mode='equilibrium' turns by √(2·lr·weight_decay·…) "
                             "per step, which is 0 with weight_decay=0: give the base optimizer's weight_decay (> 0)")

    def prepare(self, param, grad, state, hp):
        return momentum_direction_(state["momentum_buffer"], grad, hp["momentum"], hp["nesterov"])

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        """New weight − old weight for complete matrices [N, m, n] (the difference ``apply`` adds)."""
        data = batch.data
        work = torch.float64 if data.dtype == torch.float64 else torch.float32
        angle = step_angle(hp)
        if angle == 0.0:
            return torch.zeros(data.shape, dtype=work, device=data.device)  # lr 0: the weight stays bit-identical
        if batch.params is None:
            raise ValueError("rule 'spherical' needs each complete parameter in transform (per-block ‖W‖); this "
                             "executor did not bring it (MatrixKernel.transform_needs_param)")
        n_mats, rows, cols = data.shape
        size = _checked_rows(hp["block_rows"], rows)
        if hp["direction"] == "muon":
            direction = newton_schulz(data, hp["ns_steps"], hp["ns_coefficients"],
                                      resolve_dtype(hp["compute_dtype"], data.device))
        else:
            direction = data
        unit = normalize_row_blocks(direction.to(work), size).reshape(-1, size * cols)
        w = batch.params.to(work).reshape(-1, size * cols)
        _refuse_zero_blocks(w, batch, rows // size, size)
        new = hyperball_step(w, unit, angle) if hp["mode"] == "hyperball" else geodesic_step(w, unit, angle)
        return (new - w).reshape(n_mats, rows, cols)

    def apply(self, param, update, state, hp, fan_out, fan_in):
        if param.dtype in (torch.float32, torch.float64):
            param.add_(update.to(param.dtype))
        else:
            param.copy_(param.float() + update.float())


def _refuse_zero_blocks(w: torch.Tensor, batch: MatrixBatch, blocks_per_matrix: int, size: int) -> None:
    zero = w.abs().amax(dim=1) == 0
    if bool(zero.any()):
        first = int(zero.nonzero()[0])
        matrix = first // blocks_per_matrix
        for seg in batch.segments:
            if matrix < seg.count:
                break
            matrix -= seg.count
        raise ValueError(f"parameter {seg.fqn!r}: rule 'spherical' keeps each block's norm fixed, and a block of "
                         f"{size} rows is zero, so it could never move; initialise it non-zero, or route it to "
                         "another rule with an override")


def _checked_rows(block_rows: int, rows: int) -> int:
    if block_rows and rows % block_rows:
        raise ValueError(f"rule 'spherical': block_rows={block_rows} does not divide the matrix's {rows} rows")
    return block_rows or rows


def spherical_reference_step(
    W: torch.Tensor, G: torch.Tensor, B: torch.Tensor, *, lr: float, momentum: float, nesterov: bool,
    direction: str, ns_steps: int, ns_coefficients: str, block_rows: int, mode: str,
    weight_decay: float = 0.0, equilibrium_of: str = "muon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One spherical step on a single [fan_out, fan_in] matrix, written plainly in float64, block by block.

    Returns (new W, new momentum buffer); inputs are not modified.
    """
    W, G, B = (t.to(torch.float64) for t in (W, G, B))
    B = momentum * B + (1.0 - momentum) * G
    D = G + momentum * (B - G) if nesterov else B
    O = newton_schulz_reference(D, ns_steps, ns_coefficients) if direction == "muon" else D
    rows = block_rows or W.shape[0]
    hp = {"mode": mode, "lr": lr, "weight_decay": weight_decay, "momentum": momentum,
          "equilibrium_of": equilibrium_of}
    angle = step_angle(hp)
    out = W.clone()
    if angle == 0.0:
        return out, B
    for start in range(0, W.shape[0], rows):
        w = W[start:start + rows]
        o = O[start:start + rows]
        r = torch.linalg.norm(w)
        o_norm = torch.linalg.norm(o)
        if o_norm == 0:
            continue
        u = o / o_norm
        if mode == "hyperball":
            moved = w - lr * r * u
            out[start:start + rows] = r * moved / torch.linalg.norm(moved)
        else:
            w_hat = w / r
            t = -u + (u * w_hat).sum() * w_hat
            out[start:start + rows] = math.cos(angle) * w + math.sin(angle) * r * t / torch.linalg.norm(t)
    return out, B
