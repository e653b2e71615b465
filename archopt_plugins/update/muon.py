"""Muon: momentum, then steepest descent under the spectral norm (the orthogonalized momentum).

For a hidden matrix W with gradient G (Jordan et al. 2024; torch.optim.Muon):

    B ← μ·B + (1−μ)·G                      (EMA form; the sum form differs by a scale NS removes)
    D = G + μ·(B − G)  if Nesterov else B
    O = NewtonSchulz(D)                    (≈ U·Vᵀ of D = U·S·Vᵀ)
    W ← (1 − η·λ)·W − η·s·O

with s from ``lr_scaling`` on the matrix's (fan_out m, fan_in n):
``"shape"`` √max(1, m/n) (Muon's original), ``"spectral"`` √(m/n) (the spectral-norm condition
of Bernstein's modular norm), ``"match_adamw"`` 0.2·√max(m, n) (Moonlight: AdamW's update RMS, so
AdamW's lr and weight decay carry over).

Applies to matrices whose rows and columns are feature dimensions (hidden, attention, MLP,
experts, flattened conv); not to embeddings, output heads or vectors, which the plan sends to AdamW.
"""

from __future__ import annotations

import math

import torch

from .kernel import HParams, MatrixBatch, MatrixKernel, add_scaled_, resolve_dtype, zeros_state
from .newton_schulz import newton_schulz, newton_schulz_reference

LR_SCALINGS = ("shape", "spectral", "match_adamw")


def lr_scale(fan_out: int, fan_in: int, mode: str) -> float:
    """The per-matrix multiplier s of the learning rate."""
    if mode == "shape":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if mode == "spectral":
        return math.sqrt(fan_out / fan_in)
    if mode == "match_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    raise ValueError(f"lr_scaling must be one of {list(LR_SCALINGS)}, got {mode!r}")


def momentum_direction_(buf: torch.Tensor, grad: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """Advance the momentum buffer in place and return the direction to orthogonalize."""
    g = grad.to(buf.dtype)
    buf.lerp_(g, 1.0 - momentum)
    return g.lerp(buf, momentum) if nesterov else buf


class MuonKernel(MatrixKernel):
    transform_keys = ("ns_steps", "ns_coefficients", "compute_dtype")
    local_state_keys = ("momentum_buffer",)
    splits_by_matrix = True  # Newton–Schulz per matrix, no owner state

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": zeros_state(param)}

    def prepare(self, param, grad, state, hp):
        direction = momentum_direction_(state["momentum_buffer"], grad, hp["momentum"], hp["nesterov"])
        # Newton–Schulz starts by rounding its input to the compute dtype; rounding here instead is the
        # same arithmetic and lets executors batch (concatenate, or send) half the bytes in bf16.
        return direction.to(resolve_dtype(hp["compute_dtype"], direction.device))

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        dtype = resolve_dtype(hp["compute_dtype"], batch.data.device)
        return newton_schulz(batch.data, hp["ns_steps"], hp["ns_coefficients"], dtype)

    def apply(self, param, update, state, hp, fan_out, fan_in):
        scale = lr_scale(fan_out, fan_in, hp["lr_scaling"])
        add_scaled_(param, update, hp["lr"], hp["weight_decay"], scale)


def muon_reference_step(
    W: torch.Tensor, G: torch.Tensor, B: torch.Tensor, *, lr: float, momentum: float, nesterov: bool,
    weight_decay: float, ns_steps: int, ns_coefficients: str, lr_scaling: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Muon step on a single [fan_out, fan_in] matrix, written plainly in float64.

    Returns (new W, new momentum buffer); inputs are not modified.
    """
    W, G, B = (t.to(torch.float64) for t in (W, G, B))
    B = momentum * B + (1.0 - momentum) * G
    D = G + momentum * (B - G) if nesterov else B
    O = newton_schulz_reference(D, ns_steps, ns_coefficients)
    s = lr_scale(W.shape[0], W.shape[1], lr_scaling)
    return (1.0 - lr * weight_decay) * W - lr * s * O, B
