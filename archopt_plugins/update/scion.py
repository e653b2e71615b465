"""Scion (Pethick et al. 2025, "Training Deep Learning Models with Norm-Constrained LMOs").

Each parameter moves along the linear minimization oracle (LMO) of a norm ball chosen for its role:

    d ← μ·d + (1−μ)·g                     (Scion's α is 1 − μ; its default α = 0.1 is μ = 0.9)
    W ← (1 − η·λ)·W − η·ρ·lmo(d)          (λ = 1: Scion's constrained variant, iterates stay in the
                                           ball of radius ρ; λ = 0: the unconstrained variant)

with ρ the per-role radius (``scale``) and, on the matrix view [fan_out m, fan_in n]:

========== ============================================ =============== =========================
rule        lmo(D) (up to the sign Scion puts in front)  needs           Scion's default role
========== ============================================ =============== =========================
spectral   NewtonSchulz(D) · s(m, n)                    whole matrix    hidden matrices
sign       sign(D) / n                                  elementwise     output head
rownorm    each row of D scaled to unit RMS             reductions      embedding tables
colnorm    each column of D scaled to unit RMS          reductions      (input layers, by override)
========== ============================================ =============== =========================

``s(m, n)`` comes from ``lr_scaling``; its default ``"spectral"`` = √(m/n) is Scion's normalized
spectral LMO (``"shape"`` = √max(1, m/n) is its ``max=True`` variant). The sign LMO's 1/n makes
the head's update independent of the width (Scion's normalized ``Sign``).

Orientation of embeddings. Scion's code calls the embedding's LMO ``ColNorm`` and applies it with
``transpose=True`` to the stored [vocab, d] table: it normalizes every token's vector to unit RMS.
Our matrix view of an embedding is that stored table (rows are tokens; the same view as a tied
output head), so the same operation is a row normalization here: ``rownorm``.

Scion's sign LMO only needs the local elements plus the matrix's fan_in, so it is written as a
:class:`MatrixKernel` (``apply`` receives fan_out/fan_in) with an elementwise ``transform`` and
declares ``needs = "elementwise"``: an executor may run it on a shard without gathering.
"""

from __future__ import annotations

import math

import torch

from .kernel import HParams, MatrixBatch, MatrixKernel, add_scaled_, resolve_dtype, zeros_state
from .muon import lr_scale
from .newton_schulz import newton_schulz, newton_schulz_reference

_NORM_EPS = 1e-8  # added to the RMS before dividing (Scion's value), so a zero row stays zero

LMOS = ("spectral", "sign", "rownorm", "colnorm")


class _ScionKernel(MatrixKernel):
    """Momentum (prepare) and the scaled, decayed step (apply) shared by every Scion LMO."""

    local_state_keys = ("momentum_buffer",)
    splits_by_matrix = True  # every LMO acts on each matrix alone; no owner state

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": zeros_state(param)}

    def prepare(self, param, grad, state, hp):
        buf = state["momentum_buffer"]
        buf.lerp_(grad.to(buf.dtype), 1.0 - hp["momentum"])
        return buf

    def dim_factor(self, fan_out: int, fan_in: int, hp: HParams) -> float:
        return 1.0

    def apply(self, param, update, state, hp, fan_out, fan_in):
        add_scaled_(param, update, hp["lr"], hp["weight_decay"], hp["scale"] * self.dim_factor(fan_out, fan_in, hp))


class ScionSpectralKernel(_ScionKernel):
    needs = "whole_matrix"
    transform_keys = ("ns_steps", "ns_coefficients", "compute_dtype")

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        dtype = resolve_dtype(hp["compute_dtype"], batch.data.device)
        return newton_schulz(batch.data, hp["ns_steps"], hp["ns_coefficients"], dtype)

    def dim_factor(self, fan_out, fan_in, hp):
        return lr_scale(fan_out, fan_in, hp["lr_scaling"])


class ScionSignKernel(_ScionKernel):
    needs = "elementwise"  # transform is elementwise; apply only needs fan_in (see the module docstring)

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        return torch.sign(batch.data)

    def dim_factor(self, fan_out, fan_in, hp):
        return 1.0 / fan_in

    def cost(self, count: int, fan_out: int, fan_in: int) -> float:
        return float(count) * fan_out * fan_in


def unit_rms_(D: torch.Tensor, dim: int) -> torch.Tensor:
    """``D`` with every slice along ``dim`` (-1: rows, -2: columns) scaled to unit RMS (new tensor)."""
    rms = torch.linalg.vector_norm(D, dim=dim, keepdim=True).div_(math.sqrt(D.shape[dim]))
    return D / rms.add_(_NORM_EPS)


class ScionRowNormKernel(_ScionKernel):
    needs = "reductions"  # one norm per row: shards could all-reduce row statistics instead of gathering

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        return unit_rms_(batch.data, -1)

    def cost(self, count: int, fan_out: int, fan_in: int) -> float:
        return float(count) * fan_out * fan_in


class ScionColNormKernel(ScionRowNormKernel):
    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        return unit_rms_(batch.data, -2)


def scion_lmo_reference(D: torch.Tensor, lmo: str, *, ns_steps: int = 5, ns_coefficients: str = "quintic",
                        lr_scaling: str = "spectral") -> torch.Tensor:
    """The LMO direction (already times its dimension factor) of one [m, n] matrix, in float64."""
    D = D.to(torch.float64)
    m, n = D.shape
    if lmo == "spectral":
        return newton_schulz_reference(D, ns_steps, ns_coefficients) * lr_scale(m, n, lr_scaling)
    if lmo == "sign":
        return torch.sign(D) / n
    if lmo == "rownorm":
        rms = (D * D).sum(dim=1, keepdim=True).sqrt() / math.sqrt(n)
        return D / (rms + _NORM_EPS)
    if lmo == "colnorm":
        rms = (D * D).sum(dim=0, keepdim=True).sqrt() / math.sqrt(m)
        return D / (rms + _NORM_EPS)
    raise ValueError(f"lmo must be one of {list(LMOS)}, got {lmo!r}")


def scion_reference_step(
    W: torch.Tensor, G: torch.Tensor, d: torch.Tensor, lmo: str, *, lr: float, momentum: float,
    weight_decay: float, scale: float, **lmo_options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Scion step on a single [fan_out, fan_in] matrix in float64. Returns (W, momentum buffer)."""
    W, G, d = (t.to(torch.float64) for t in (W, G, d))
    d = momentum * d + (1.0 - momentum) * G
    W = (1.0 - lr * weight_decay) * W - lr * scale * scion_lmo_reference(d, lmo, **lmo_options)
    return W, d
