"""Adafactor (Shazeer & Stern 2018): a factored second moment and update clipping, for matrices.

For each matrix G (m×n) at step t, with β₂ₜ = 1 − t^(−beta2_decay):

    R ← β₂ₜ·R + (1−β₂ₜ)·rowmean(G² + ε)          (m numbers)
    C ← β₂ₜ·C + (1−β₂ₜ)·colmean(G² + ε)          (n numbers)
    V̂ = (R / mean(R))·Cᵀ                          (rank-1 estimate of E[G²])
    U = G / √V̂,   U ← U / max(1, RMS(U)/clip_threshold)
    M ← β₁·M + (1−β₁)·U   if momentum β₁ > 0 (U otherwise)
    W ← (1 − η·λ)·W − η·M

State is m + n numbers per matrix (plus M with momentum). No "relative step" or parameter-scale
magic: the learning rate is the one given, as for every other rule. This is the arithmetic of
``transformers.optimization.Adafactor(relative_step=False, scale_parameter=False,
warmup_init=False)``, which the tests compare against.

The statistics are row and column reductions and the clipping an RMS over the matrix, so the
kernel declares ``needs = "reductions"``; ``transform`` sees complete matrices (batched by shape)
and keeps R and C in owner state.
"""

from __future__ import annotations

import math

import torch

from .kernel import HParams, MatrixBatch, MatrixKernel, add_scaled_, zeros_state
from .owner_state import keep_finite_, spans, state_of, zero_nonfinite_


class AdafactorKernel(MatrixKernel):
    needs = "reductions"
    local_state_keys = ("exp_avg",)  # only with momentum > 0
    state_shapes_complete = True
    transform_keys = ("beta2_decay", "eps", "clip_threshold")

    def _local_keys(self, hp: HParams) -> tuple[str, ...]:
        return ("exp_avg",) if hp["momentum"] > 0 else ()

    def state_shapes(self, shape, matrix_shape, hp) -> dict[str, tuple[int, ...]]:
        shapes = {k: tuple(shape) for k in self._local_keys(hp)}
        if matrix_shape is not None:
            count, m, n = matrix_shape
            shapes["row_sq"], shapes["col_sq"] = (count, m), (count, n)
        return shapes

    def state_bytes(self, shape, matrix_shape, hp) -> int:
        return 4 * sum(math.prod(s) for s in self.state_shapes(tuple(shape), matrix_shape, hp).values())

    def describe(self, matrix_shape, hp) -> str:
        return "factored rows+cols" if matrix_shape is not None else ""

    def cost(self, count: int, fan_out: int, fan_in: int) -> float:
        return float(count) * fan_out * fan_in

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"exp_avg": zeros_state(param)} if hp["momentum"] > 0 else {}

    def prepare(self, param, grad, state, hp):
        return grad

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        G = batch.data.float().contiguous()  # the same layout alone or batched; never modified in place
        N, m, n = G.shape
        decay = hp["beta2_decay"]  # β₂ at step t is 1 − t^(−decay), per parameter, in Python floats
        sq = G * G + hp["eps"]
        rows, cols = torch.empty(N, m, device=G.device), torch.empty(N, n, device=G.device)
        row_means, col_means = sq.mean(dim=-1), sq.mean(dim=-2)
        for seg, a, b in spans(batch):
            beta2 = 1.0 - seg.step ** (-decay)
            for key, size, means, out in (("row_sq", m, row_means, rows), ("col_sq", n, col_means, cols)):
                stat = state_of(seg, key, (size,), torch.float32, G.device)
                keep_finite_(stat, stat * beta2 + (1.0 - beta2) * means[a:b])
                out[a:b] = stat
        row_factor = (rows / rows.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
        col_factor = cols.rsqrt().unsqueeze(-2)
        update = G * row_factor * col_factor
        rms = torch.linalg.matrix_norm(update, keepdim=True) / math.sqrt(m * n)
        update = update / (rms / hp["clip_threshold"]).clamp_min(1.0)
        return zero_nonfinite_(update, batch, "adafactor")

    def apply(self, param, update, state, hp, fan_out, fan_in):
        beta1 = hp["momentum"]
        if beta1 > 0:
            buf = state["exp_avg"]
            buf.lerp_(update.to(buf.dtype), 1.0 - beta1)
            update = buf
        add_scaled_(param, update, hp["lr"], hp["weight_decay"], 1.0)


def adafactor_reference_step(W: torch.Tensor, G: torch.Tensor, state: dict, step: int, *, lr: float,
                             momentum: float, beta2_decay: float, eps: float, clip_threshold: float,
                             weight_decay: float) -> torch.Tensor:
    """One Adafactor step on one [m, n] matrix in float64, written plainly; returns the new W."""
    W, G = W.to(torch.float64), G.to(torch.float64)
    beta2 = 1.0 - step ** (-beta2_decay)
    sq = G * G + eps
    R = beta2 * state.get("row_sq", torch.zeros(G.shape[0], dtype=torch.float64)) + (1 - beta2) * sq.mean(dim=1)
    C = beta2 * state.get("col_sq", torch.zeros(G.shape[1], dtype=torch.float64)) + (1 - beta2) * sq.mean(dim=0)
    state["row_sq"], state["col_sq"] = R, C
    V = torch.outer(R / R.mean(), C)
    U = G / V.sqrt()
    rms = float(U.pow(2).mean().sqrt())
    U = U / max(1.0, rms / clip_threshold)
    if momentum > 0:
        U = momentum * state.get("exp_avg", torch.zeros_like(G)) + (1 - momentum) * U
        state["exp_avg"] = U
    return (1 - lr * weight_decay) * W - lr * U
