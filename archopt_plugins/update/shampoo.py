"""Shampoo (Gupta et al. 2018) and one-sided Shampoo, blocked, grafted to Adam's step size.

For each block G (r×c) of a matrix's gradient:

    L ← β₂·L + (1−β₂)·G·Gᵀ,   R ← β₂·R + (1−β₂)·Gᵀ·G       (statistics="ema"; "sum": L ← L + G·Gᵀ)
    every k steps:  L⁻ = (L/(1−β₂ᵗ))^(−1/4),  R⁻ = (R/(1−β₂ᵗ))^(−1/4)   (damped, matrix_roots.py)
    P = L⁻·G·R⁻

* **one side.** ``one_sided_shampoo`` — and two-sided Shampoo on blocks whose longer side exceeds
  ``one_sided_ratio``× the shorter — keep only the shorter side's factor with exponent 1/2:
  P = L^(−1/2)·G (or G·R^(−1/2)). "Structured Preconditioners in Adaptive Optimization: A Unified
  Analysis" (Xie et al. 2025) proves this variant a better rate than two-sided Shampoo; it also
  needs one factor instead of two.
* **grafting** (``graft="adam"``): Shampoo's direction, Adam's size. Per block,
  P ← P·‖A‖_F/‖P‖_F with A = G/(√(v/(1−β₂ᵗ)) + ε) and v the EMA (or sum) of G². This lets Adam's
  learning rate carry over and absorbs the roots' staleness between recomputations.
  ``graft="none"`` uses P as it is (≈ the polar factor U·Vᵀ at step 1).
* **momentum**: M ← β₁·M + (1−β₁)·P (bias-corrected), then W ← (1 − η·λ)·W − η·M̂.

Where it runs: ``prepare`` passes the gradient through; ``transform`` (complete matrices, batched by
shape) keeps L, R, their roots and the graft moment in owner state; ``apply`` does momentum and the
step on the local piece. Guards: see ``owner_state.py`` (finite statistics only) and
``matrix_roots.py`` (rank deficiency, eigh failure).
"""

from __future__ import annotations

import torch

from .blocked_kernel import BlockedPreconditionerKernel, compute_dtype_of
from .blocking import BlockGrid, Sides
from .kernel import HParams, MatrixBatch, add_scaled_, zeros_state
from .matrix_roots import inverse_root, inverse_root_reference
from .owner_state import (gather_state, keep_finite_, per_matrix, scatter_state, warn_decomposition_failed,
                          zero_nonfinite_)

GRAFTS = ("adam", "none")
STATISTICS = ("ema", "sum")


class ShampooKernel(BlockedPreconditionerKernel):
    local_state_keys = ("exp_avg",)  # only with betas[0] > 0
    transform_keys = ("betas", "eps", "matrix_eps", "precondition_frequency", "statistics", "block_size",
                      "one_sided_ratio", "graft", "root_dtype", "compute_dtype")

    def __init__(self, sides: Sides = "two_sided") -> None:
        self.sides = sides
        if sides == "one_sided":  # every block is one-sided: the ratio is not a hyperparameter
            self.transform_keys = tuple(k for k in self.transform_keys if k != "one_sided_ratio")
        self.label = "shampoo" if sides == "two_sided" else "one_sided_shampoo"

    # -- state layout ---------------------------------------------------------------------------
    def local_keys(self, hp: HParams) -> tuple[str, ...]:
        return ("exp_avg",) if hp["betas"][0] > 0 else ()

    def owner_matrix_keys(self, hp: HParams) -> tuple[str, ...]:
        return ("graft_sq",) if hp["graft"] == "adam" else ()

    def factor_keys(self, side: str) -> tuple[str, ...]:
        return (side, f"{side}_root")

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"exp_avg": zeros_state(param)} if hp["betas"][0] > 0 else {}

    # -- the three phases -----------------------------------------------------------------------
    def prepare(self, param, grad, state, hp):
        return grad

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        dtype = compute_dtype_of(hp)
        root_dtype = compute_dtype_of({"compute_dtype": hp["root_dtype"]})
        # Contiguous, so a matrix's arithmetic is the same whether it came alone (maybe a transposed
        # view of its gradient) or concatenated with others. May alias the gradient: never modified.
        G = batch.data.to(dtype).contiguous()
        N, m, n = G.shape
        grid = self.grid(m, n, hp)
        beta2, ema = hp["betas"][1], hp["statistics"] == "ema"
        freq = hp["precondition_frequency"]
        due = per_matrix(batch, lambda t: float((t - 1) % freq == 0)) > 0
        # EMA bias corrections 1 − β₂ᵗ per matrix (1 for summed statistics)
        corrections = per_matrix(batch, (lambda t: 1.0 - beta2 ** t) if ema else (lambda t: 1.0), dtype=dtype)

        directions = []
        for cl, g in zip(grid.classes, grid.split(G)):
            block = g  # preconditioned side by side; the statistics use the raw gradient g
            block_due = due.repeat_interleave(cl.count)
            block_corrections = corrections.repeat_interleave(cl.count)
            for side, on, size in (("L", cl.left, cl.rows), ("R", cl.right, cl.cols)):
                if not on:
                    continue
                key = f"{side}.{cl.key}"
                stat = gather_state(batch, key, (cl.count, size, size), dtype)
                flat = stat.view(-1, size, size)
                outer = g @ g.mT if side == "L" else g.mT @ g
                keep_finite_(flat, beta2 * flat + (1.0 - beta2) * outer if ema else flat + outer)
                scatter_state(batch, key, stat)
                root = gather_state(batch, f"{side}_root.{cl.key}", (cl.count, size, size), dtype)
                flat_root = root.view(-1, size, size)
                if bool(block_due.any()):
                    self._recompute_roots(batch, flat, flat_root, block_due, block_corrections, cl.count,
                                          cl.exponent, hp["matrix_eps"], root_dtype)
                    scatter_state(batch, f"{side}_root.{cl.key}", root)
                block = flat_root @ block if side == "L" else block @ flat_root
            directions.append(block)

        if hp["graft"] == "adam":
            directions = self._graft(batch, G, grid, directions, corrections, hp, dtype)
        update = grid.merge(directions)
        return zero_nonfinite_(update, batch, self.label)

    def _recompute_roots(self, batch, stat, root, due, corrections, blocks_per_matrix, exponent, matrix_eps,
                         root_dtype):
        rows = due.nonzero().flatten()
        every = rows.numel() == stat.shape[0]
        chosen = stat if every else stat.index_select(0, rows)
        # Bias-correct the EMA so a root does not depend on how many steps the EMA has seen.
        chosen = chosen / (corrections if every else corrections.index_select(0, rows)).view(-1, 1, 1)
        new_root, ok = inverse_root(chosen, exponent, matrix_eps, root_dtype)
        if not bool(ok.all()):
            full_ok = torch.ones(stat.shape[0], dtype=torch.bool, device=stat.device)
            full_ok[rows] = ok
            warn_decomposition_failed(batch, full_ok, blocks_per_matrix, self.label)
            old = root if every else root.index_select(0, rows)
            new_root = torch.where(ok.view(-1, 1, 1), new_root, old)
        if every:
            root.copy_(new_root)
        else:
            root.index_copy_(0, rows, new_root)

    def _graft(self, batch, G, grid: BlockGrid, directions, corrections, hp, dtype):
        beta2, eps = hp["betas"][1], hp["eps"]
        v = gather_state(batch, "graft_sq", tuple(G.shape[1:]), dtype)
        if hp["statistics"] == "ema":
            keep_finite_(v, beta2 * v + (1.0 - beta2) * G * G)
            denom = (v / corrections.view(-1, 1, 1)).sqrt_().add_(eps)
        else:
            keep_finite_(v, v + G * G)
            denom = v.sqrt().add_(eps)
        scatter_state(batch, "graft_sq", v)
        adam = G / denom
        grafted = []
        for direction, adam_block in zip(directions, grid.split(adam)):
            size = torch.linalg.matrix_norm(adam_block, keepdim=True)
            norm = torch.linalg.matrix_norm(direction, keepdim=True)
            # A zero direction (zero gradient) stays zero instead of 0/0.
            scale = torch.where(norm > 0, size / norm.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(norm))
            grafted.append(direction * scale)
        return grafted

    def apply(self, param, update, state, hp, fan_out, fan_in):
        beta1 = hp["betas"][0]
        if beta1 > 0:
            buf = state["exp_avg"]
            buf.lerp_(update.to(buf.dtype), 1.0 - beta1)
            update = buf / (1.0 - beta1 ** int(state["step"]))
        add_scaled_(param, update, hp["lr"], hp["weight_decay"], 1.0)


def shampoo_reference_step(W: torch.Tensor, G: torch.Tensor, state: dict, step: int, *, sides: Sides,
                           lr: float, betas: tuple[float, float], eps: float, matrix_eps: float,
                           weight_decay: float, precondition_frequency: int, statistics: str,
                           block_size: int, one_sided_ratio: float, graft: str) -> torch.Tensor:
    """One Shampoo step on a single [m, n] matrix in float64, written block by block with loops.

    ``state`` (a plain dict, updated in place) holds per-block "L"/"R"/"L_root"/"R_root" keyed by
    (block row, block col), "graft_sq" and "exp_avg". Returns the new W.
    """
    W, G = W.to(torch.float64), G.to(torch.float64)
    beta1, beta2 = betas
    ema = statistics == "ema"
    grid = BlockGrid(W.shape[0], W.shape[1], block_size, sides, one_sided_ratio)
    if graft == "adam":
        v = state.get("graft_sq", torch.zeros_like(G))
        v = beta2 * v + (1 - beta2) * G * G if ema else v + G * G
        state["graft_sq"] = v
        v_hat = v / (1 - beta2 ** step) if ema else v
        adam = G / (v_hat.sqrt() + eps)
    update = torch.zeros_like(G)
    for cl in grid.classes:
        for bi in range(cl.row_count):
            for bj in range(cl.col_count):
                r0, c0 = cl.row_start + bi * cl.rows, cl.col_start + bj * cl.cols
                rows, cols = slice(r0, r0 + cl.rows), slice(c0, c0 + cl.cols)
                g = G[rows, cols]
                p = g
                for side, on, outer in (("L", cl.left, g @ g.T), ("R", cl.right, g.T @ g)):
                    if not on:
                        continue
                    key = (side, r0, c0)
                    stat = state.get(key, torch.zeros_like(outer))
                    stat = beta2 * stat + (1 - beta2) * outer if ema else stat + outer
                    state[key] = stat
                    if (step - 1) % precondition_frequency == 0:
                        corrected = stat / (1 - beta2 ** step) if ema else stat
                        state[(side + "_root", r0, c0)] = inverse_root_reference(corrected, cl.exponent, matrix_eps)
                    root = state[(side + "_root", r0, c0)]
                    p = root @ p if side == "L" else p @ root
                if graft == "adam":
                    a = adam[rows, cols]
                    norm = float(torch.linalg.norm(p))
                    p = p * (float(torch.linalg.norm(a)) / norm) if norm > 0 else torch.zeros_like(p)
                update[rows, cols] = p
    if beta1 > 0:
        m = state.get("exp_avg", torch.zeros_like(G))
        m = beta1 * m + (1 - beta1) * update
        state["exp_avg"] = m
        update = m / (1 - beta1 ** step)
    return (1 - lr * weight_decay) * W - lr * update
